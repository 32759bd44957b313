"""Start an ipykernel under an address-space limit.

Run by path (not as a package module) so the kernel imports nothing of kernel_mcp:
``python _kernel_launcher.py <limit-bytes> -f <connection file> [ipykernel args]``.
"""

import resource
import sys


def main() -> None:
    limit = int(sys.argv.pop(1))
    if limit > 0:
        _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    # The launcher's own folder must not shadow user modules.
    sys.path[:] = [p for p in sys.path if not p.endswith("kernel_mcp")]
    from ipykernel import kernelapp

    kernelapp.launch_new_instance()


if __name__ == "__main__":
    main()

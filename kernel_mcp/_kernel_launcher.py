"""Start an ipykernel under an address-space limit, with an IOPub queue that never drops.

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
    import zmq
    from ipykernel.kernelapp import IPKernelApp

    class KernelApp(IPKernelApp):
        def init_iopub(self, context: zmq.Context) -> None:  # type: ignore[type-arg]
            # Unbounded IOPub send queue: past ZeroMQ's default 1,000 queued messages a PUB
            # socket drops output silently whenever the client reads slower than the code
            # prints (20,000 display() calls on a loaded machine lost half of them).
            context.setsockopt(zmq.SNDHWM, 0)
            super().init_iopub(context)  # type: ignore[no-untyped-call]

    KernelApp.launch_instance()


if __name__ == "__main__":
    main()

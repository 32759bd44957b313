"""Test helpers shared by the suites: the scripted fake LLM server."""

"""Tests of the scripted LLM (kernel_agent_pytest.scripted_llm) and what litellm makes of it."""

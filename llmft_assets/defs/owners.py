"""Who owns llmft's assets (shown in the UI, used by alert routing)."""

OWNERS = ["team:llmft"]

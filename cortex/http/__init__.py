"""cortex's OpenAI-compatible HTTP API and its /metrics, served by aiohttp on cortex's event loop."""

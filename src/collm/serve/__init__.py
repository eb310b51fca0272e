"""`collm serve`: an OpenAI-compatible HTTP server whose every token says which model wrote it.

protocol (request and response schemas) / scheduler (one thread drives the engine) / serving (completions and
chat over the scheduler) / app (FastAPI routes, errors, limits, the playground page at ``/``).
"""

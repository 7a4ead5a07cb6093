"""One generation request from admission to answer: the OpenAI request schema and its bounds,
token counting, the service that runs a request against an engine, and the SSE relay."""

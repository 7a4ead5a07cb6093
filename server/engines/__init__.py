"""The gateway's side of its engines: the engine seam, the OpenAI-HTTP engine client, the engine
process it supervises, its health monitor, adapter slots and admission."""

"""Processes that speak the engine protocol (OpenAI HTTP plus runtime adapter loading) but are not
part of the gateway: the fake engine the tests and benchmarks run."""

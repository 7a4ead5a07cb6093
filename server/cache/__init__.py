"""The result cache: which requests are repeatable, their keys, and the Redis store behind them."""

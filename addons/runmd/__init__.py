"""The runmd language (syntax, plugin base classes, compile) and the engine that runs `+ .runtime` and `+ .engine`."""

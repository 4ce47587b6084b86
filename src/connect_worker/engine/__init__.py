"""The engine: supervisor, sessions, steps, the user-code thread, the SDK bridge."""

"""Model helpers outside the package: making test copies of the default model (no weights here)."""

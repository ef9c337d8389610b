"""Process-wide service concerns: typed settings and logging."""

"""lathe.bench: timing and statistics, backends, scenarios, quality, reports."""

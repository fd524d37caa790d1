"""`ftlab compare`: the same task under several policies (and seeds), run and reported side by side.
`variants` names what differs, `runner` runs (or reuses) each fit, `report` reads their summaries."""

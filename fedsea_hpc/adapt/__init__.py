"""The adaptive part: cost model, partition planner and live migration, each its own module."""

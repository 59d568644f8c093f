"""PSS, USS and swap per mapping, as smaps computes them: the reader, and the
live refresher used by watch, run and agent."""

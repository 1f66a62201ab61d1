"""Choosing the tiles: schedules, block scores, the Pruner and its strategies, refitting the kept weights."""

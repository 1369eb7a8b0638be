//! Leaderboard tables, trajectories and plots with Polars. Arrives with the Search issue.

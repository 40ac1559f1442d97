"""Reporting: plots, reports, the leaderboard and the checks that guard its submissions."""

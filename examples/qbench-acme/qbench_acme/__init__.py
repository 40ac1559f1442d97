"""qbench-acme: an example third-party qbench plugin package (see qbench_acme.plugin)."""

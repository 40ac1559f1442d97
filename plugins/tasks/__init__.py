"""The built-in task types (one module each), registered by :mod:`qbench_plugins.tasks.plugin`."""

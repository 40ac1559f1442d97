"""qbench's built-in plugins. They register through the same hooks as third-party packages.

This ``__init__`` is read by the core (:mod:`qbench.builtins`) and must stay light (no plugin imports):

* :data:`BUILTIN_PLUGINS` — every built-in plugin module, in registration order;
* :data:`COMMAND_PLUGINS` — those adding ``qbench`` commands, imported alone for ``qbench --help``;
* :data:`EVAL_DEFAULTS` — what an argument-less ``qbench eval`` runs: the offline toy world.
"""

from qbench.builtins import EvalDefaults

BUILTIN_PLUGINS: tuple[str, ...] = (
    "qbench_plugins.toyworld.plugin",
    "qbench_plugins.models.plugin",
    "qbench_plugins.quantizers.fp32",
    "qbench_plugins.quantizers.minmax",
    "qbench_plugins.quantizers.smoothquant",
    "qbench_plugins.quantizers.outlier_suppression",
    "qbench_plugins.quantizers.igq_vit",
    "qbench_plugins.quantizers.q_vlm",
    "qbench_plugins.quantizers.qwt",
    "qbench_plugins.quantizers.apq_vit",
    "qbench_plugins.quantizers.quarot",
    "qbench_plugins.quantizers.qat_ste",
    "qbench_plugins.quantizers.lsq_qat",
    "qbench_plugins.quantizers.q_vit",
    "qbench_plugins.quantizers.qat_lora",
    "qbench_plugins.quantizers.rot_lsq",
    "qbench_plugins.scorers.msp",
    "qbench_plugins.scorers.energy",
    "qbench_plugins.scorers.entropy",
    "qbench_plugins.scorers.mcm",
    "qbench_plugins.scorers.generic_negative",
    "qbench_plugins.scorers.neglabel",
    "qbench_plugins.scorers.eoe",
    "qbench_plugins.scorers.eoe_envision",
    "qbench_plugins.datasets.cifar",
    "qbench_plugins.datasets.cifar10c",
    "qbench_plugins.datasets.imagenet",
    "qbench_plugins.datasets.mos",
    "qbench_plugins.datasets.imagenet_variants",
    "qbench_plugins.datasets.counteranimal",
    "qbench_plugins.datasets.user_folders",
    "qbench_plugins.datasets.webdataset_proxy",
    "qbench_plugins.tasks.plugin",
    "qbench_plugins.suites",
)

COMMAND_PLUGINS: tuple[str, ...] = (
    "qbench_plugins.scorers.eoe_envision",  # qbench envision
)

EVAL_DEFAULTS = EvalDefaults(model="toy-clip", quantizer="minmax", suites=("toy-id",), proxy="toy-proxy")

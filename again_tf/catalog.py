"""The names the command-line help lists, kept free of TensorFlow so `--help` is instant.

Each list here is the single source of its names: `again_tf.data`, `again_tf.models`,
`again_tf.defenses.registry` and `again_tf.evaluation` take theirs from this module
(`tests/test_cli.py` checks that the registry's built-in defenses are exactly these).
"""

DATASETS = ("fashion_mnist", "mnist", "cifar10", "cifar100", "svhn")

MODELS = ("small_cnn", "resnet18", "preact_resnet18", "wrn34_10")

# The built-in defense names of `again_tf.defenses.registry`, in its order.
DEFENSES = ("none", "pgd_at", "trades", "mart", "awp", "trades_awp", "mart_awp", "fat",
            "fat_trades", "lbgat", "las_at", "again_pgd", "again_trades", "again_mart",
            "again_awp", "cas", "cas_trades", "cas_mart", "cifs", "bat", "classwise",
            "classwise_trades")

# Attack options of `evaluation.parse_attack` and evaluate.py, with AutoAttack's standard
# budget (Croce & Hein, ICML 2020) and our Temperature-PGD and C&W-L2 defaults.
ATTACK_OPTIONS = dict(n_iter=100, n_queries=5000, eot_iter=20, n_target_classes=9,
                      temperature=0.5, cwl2_steps=1000, cwl2_search_steps=9)
ATTACK_OPTION_HELP = dict(
    n_iter="APGD and FAB iterations (AutoAttack: 100).",
    n_queries="Square attack queries (AutoAttack: 5000).",
    eot_iter="EOT forward passes of aa_rand (AutoAttack: 20).",
    n_target_classes="Target classes of APGD-T and FAB-T (AutoAttack: 9).",
    temperature="Temperature T of Temperature-PGD (temp_pgd); the default is our choice.",
    cwl2_steps="Adam steps per binary-search step of cwl2.",
    cwl2_search_steps="Binary-search steps over c of cwl2.")

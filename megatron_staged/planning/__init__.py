"""Planning a run before it starts: ``megatron-staged plan`` and ``train --dry-run``.

``recipe.py``  the stages of a run (YAML ``staging.stages`` or ``--stages``), each stage's config
``memory.py``  parameters and memory per GPU at a TP x PP x DP layout (closed form, no model)
``cluster.py`` the layout that fits, throughput and time per stage; the printed tables
``cli.py``     the command, its modes, and the dry run
"""

"""CortexCraft: small GPT language models, trained end to end. The library never imports Prefect."""

from cortexcraft.threads import set_openmp_wait_env

# OpenMP reads its wait policy once, when torch loads it, so this must run before `import torch`
# (every cortexcraft module imports this package first). Values the user set are kept.
set_openmp_wait_env()

__version__ = "0.1.0"

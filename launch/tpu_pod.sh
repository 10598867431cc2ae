#!/usr/bin/env bash
# Train on every host of a Cloud TPU pod slice. The repository and data must be reachable from all
# hosts (same path, e.g. a shared disk or GCS-fuse); each host runs the same command and JAX
# discovers the others (jax.distributed.initialize, enabled by JAXPRM_DISTRIBUTED=1).
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/qwen2_5_vl_7b.py --config.model.hf_dir=... --config.workdir=...
set -euo pipefail
tpu=${1:?TPU name}; zone=${2:?zone}; config=${3:?config file}; shift 3
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd $(pwd) && pip install -q -e . 'jax[tpu]' && \
   JAXPRM_DISTRIBUTED=1 python -m jaxprm.train --config $config $*"

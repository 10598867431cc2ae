#!/usr/bin/env bash
# Train on several GPU hosts. Run this on every host with the same arguments, setting
#   COORDINATOR=host0:1234  NUM_HOSTS=N  HOST_ID=0..N-1
# (under SLURM use `srun --ntasks-per-node=1 env JAXPRM_DISTRIBUTED=1 python -m jaxprm.train ...`:
# JAX reads the SLURM environment itself). Each host loads its own slice of the data; the global
# batch is --config.train.batch_size over all hosts.
#
#   COORDINATOR=10.0.0.1:1234 NUM_HOSTS=2 HOST_ID=0 launch/gpu_multihost.sh configs/qwen2_5_vl_3b.py --config.workdir=/shared/runs/3b
set -euo pipefail
config=${1:?config file}; shift
export JAX_COORDINATOR_ADDRESS=${COORDINATOR:?set COORDINATOR=host:port}
export JAX_NUM_PROCESSES=${NUM_HOSTS:?set NUM_HOSTS}
export JAX_PROCESS_ID=${HOST_ID:?set HOST_ID}
exec python -m jaxprm.train --config "$config" "$@"

#!/usr/bin/env bash
# Plain-torchrun equivalent of `moesys train`: start one torchrun agent on this node.
#
# Usage:
#   launchers/torchrun.sh CONFIG [--section.key value ...]
#
# Runs `python -m torch.distributed.run ... -m system.train.main --config CONFIG [overrides]`.
# Run it once per node; all nodes of a job must use the same RDZV_ENDPOINT and RDZV_ID.
#
# Environment:
#   NNODES          node count "N", or "MIN:MAX" for an elastic job        (default 1)
#   NPROC_PER_NODE  workers per node       (default: `nvidia-smi -L | wc -l`, else 2)
#   RDZV_ENDPOINT   HOST:PORT of the c10d rendezvous; required when NNODES != 1
#   RDZV_ID         job id shared by all nodes                               (default moesys)
#   MAX_RESTARTS    worker-group restarts after a failure                    (default 0)
#   SHUTDOWN_TIMEOUT seconds between SIGTERM to the workers (they commit a checkpoint of the
#                   current step) and SIGKILL                               (default 60)
#   PYTHON          interpreter                                              (default python)
#   DRY_RUN=1       print the command instead of running it
#
# One node (NNODES=1, no RDZV_ENDPOINT) uses --standalone; otherwise the c10d rendezvous
# (no --node-rank: torchrun assigns ranks under c10d). For an elastic range (MIN != MAX) or
# MAX_RESTARTS > 0, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 is exported: without it a node
# joining a running job deadlocks (pytorch/pytorch#135712).
#
# SkyPilot: when its variables are set they fill in the ones above that are not set:
#   SKYPILOT_NUM_NODES           -> NNODES
#   SKYPILOT_NUM_GPUS_PER_NODE   -> NPROC_PER_NODE
#   first line of SKYPILOT_NODE_IPS, ":", MASTER_PORT (default 29500) -> RDZV_ENDPOINT
# so `run: launchers/torchrun.sh configs/x.toml` in a SkyPilot task works on every node.
set -euo pipefail

die() {
    echo "torchrun.sh: error: $*" >&2
    exit 2
}

usage() {
    sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

if [[ $# -lt 1 ]]; then
    usage >&2
    die "missing CONFIG"
fi
case "$1" in
    -h | --help)
        usage
        exit 0
        ;;
    -*) die "first argument must be the CONFIG file, got '$1'" ;;
esac
CONFIG="$1"
shift

# SkyPilot mapping (explicit variables win).
if [[ -n "${SKYPILOT_NUM_NODES:-}" ]]; then
    NNODES="${NNODES:-${SKYPILOT_NUM_NODES}}"
fi
if [[ -n "${SKYPILOT_NUM_GPUS_PER_NODE:-}" ]]; then
    NPROC_PER_NODE="${NPROC_PER_NODE:-${SKYPILOT_NUM_GPUS_PER_NODE}}"
fi
if [[ -n "${SKYPILOT_NODE_IPS:-}" && -z "${RDZV_ENDPOINT:-}" ]]; then
    head_ip="$(printf '%s\n' "${SKYPILOT_NODE_IPS}" | head -n1 | tr -d '[:space:]')"
    if [[ -n "${head_ip}" ]]; then
        RDZV_ENDPOINT="${head_ip}:${MASTER_PORT:-29500}"
    fi
fi

NNODES="${NNODES:-1}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=2
    if command -v nvidia-smi >/dev/null 2>&1; then
        gpus="$(nvidia-smi -L 2>/dev/null | wc -l | tr -d '[:space:]')" || gpus=0
        if [[ "${gpus}" =~ ^[0-9]+$ && "${gpus}" -gt 0 ]]; then
            NPROC_PER_NODE="${gpus}"
        fi
    fi
fi
RDZV_ENDPOINT="${RDZV_ENDPOINT:-}"
RDZV_ID="${RDZV_ID:-moesys}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
SHUTDOWN_TIMEOUT="${SHUTDOWN_TIMEOUT:-60}"
PYTHON="${PYTHON:-python}"

# Validation.
[[ "${NPROC_PER_NODE}" =~ ^[0-9]+$ && "${NPROC_PER_NODE}" -ge 1 ]] ||
    die "NPROC_PER_NODE must be an integer >= 1, got '${NPROC_PER_NODE}'"
[[ "${MAX_RESTARTS}" =~ ^[0-9]+$ ]] ||
    die "MAX_RESTARTS must be an integer >= 0, got '${MAX_RESTARTS}'"
[[ "${SHUTDOWN_TIMEOUT}" =~ ^[0-9]+$ ]] ||
    die "SHUTDOWN_TIMEOUT must be an integer >= 0 (seconds), got '${SHUTDOWN_TIMEOUT}'"
if [[ "${NNODES}" =~ ^([0-9]+)(:([0-9]+))?$ ]]; then
    min_nodes=$((10#${BASH_REMATCH[1]}))
    max_nodes=$((10#${BASH_REMATCH[3]:-${BASH_REMATCH[1]}}))
else
    die "NNODES must be 'N' or 'MIN:MAX', got '${NNODES}'"
fi
((min_nodes >= 1 && min_nodes <= max_nodes)) ||
    die "NNODES must satisfy 1 <= MIN <= MAX, got '${NNODES}' (MIN=${min_nodes}, MAX=${max_nodes})"
[[ -n "${RDZV_ID}" ]] || die "RDZV_ID must not be empty"

args=(-m torch.distributed.run)
if [[ "${max_nodes}" -eq 1 && -z "${RDZV_ENDPOINT}" ]]; then
    args+=(--standalone --nnodes 1 --nproc-per-node "${NPROC_PER_NODE}")
    if [[ "${MAX_RESTARTS}" -gt 0 ]]; then
        args+=(--max-restarts "${MAX_RESTARTS}")
    fi
else
    [[ -n "${RDZV_ENDPOINT}" ]] ||
        die "RDZV_ENDPOINT (HOST:PORT) is required when NNODES=${NNODES} (more than one node)"
    if [[ "${RDZV_ENDPOINT}" =~ ^(.+):([0-9]+)$ ]] &&
        ((10#${BASH_REMATCH[2]} >= 1 && 10#${BASH_REMATCH[2]} <= 65535)); then
        :
    else
        die "RDZV_ENDPOINT must be HOST:PORT with a port in 1..65535, got '${RDZV_ENDPOINT}'"
    fi
    args+=(
        --nnodes "${NNODES}"
        --nproc-per-node "${NPROC_PER_NODE}"
        --rdzv-backend c10d
        --rdzv-endpoint "${RDZV_ENDPOINT}"
        --rdzv-id "${RDZV_ID}"
        --max-restarts "${MAX_RESTARTS}"
    )
fi
# torch 2.11's torchrun has no --shutdown-timeout (it keeps a built-in 30 s grace): left out when the
# interpreter runs and its torchrun lacks the option.
torchrun_help="$("${PYTHON}" -m torch.distributed.run --help 2>/dev/null)" || torchrun_help="--shutdown-timeout"
if [[ "${SHUTDOWN_TIMEOUT}" -gt 0 && "${torchrun_help}" == *--shutdown-timeout* ]]; then
    args+=(--shutdown-timeout "${SHUTDOWN_TIMEOUT}")
fi
args+=(-m system.train.main --config "${CONFIG}" "$@")

if [[ "${min_nodes}" -ne "${max_nodes}" || "${MAX_RESTARTS}" -gt 0 ]]; then
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
fi

# Make the `system` package importable from a source checkout that is not pip-installed.
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${repo_root}${PYTHONPATH:+:${PYTHONPATH}}"

if [[ "${DRY_RUN:-0}" == "1" ]]; then
    prefix=""
    if [[ -n "${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-}" ]]; then
        prefix="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE} "
    fi
    printf '%s%q' "${prefix}" "${PYTHON}"
    printf ' %q' "${args[@]}"
    printf '\n'
    exit 0
fi
exec "${PYTHON}" "${args[@]}"

#!/usr/bin/env bash
# Train the deep tiny model on the hard problems, evaluate it, (optionally) profile its layers
# and write its model card, all under OUT (issue 16). On one H200 the defaults should take about
# 9 minutes (the first run: 79 s of setup, saving and evaluation around 392 s of training):
#     bash sbatch/train_deep_tiny.sh OUT                      # --minutes 7.5 --compile
#     bash sbatch/train_deep_tiny.sh OUT --smoke --steps 4    # CPU check of every stage
# Extra arguments go to `python -m v2.tiny.train` (a later --minutes wins; --no-compile turns
# the compiled step off). The compile warm-up (each fixed batch length's graph) is spent inside
# the --minutes budget. Stages, each run even if an earlier one failed (the card says what is
# missing):
#   1. train, save OUT/checkpoint, evaluate hard_test.jsonl at thresholds 1 and 0.9 (train.log)
#   2. python -m v2.tiny.card -> checkpoint/README.md and its plots (card.log), so that a card
#      exists even if the job is stopped during the analysis
#   3. only with ANALYZE=1 (default 0: the training takes the time; run `python -m v2.analyze`
#      on the saved checkpoint later, on CPU if need be): python -m v2.analyze on ANALYZE_N (64)
#      hard test problems -> checkpoint/analysis/ (analyze.log), cut off by `timeout`
#      DEADLINE_S (575) seconds after the start; with less than 60 s left it takes 16
#      problems, with less than 20 s it is skipped
#   4. the card again, now with the layer profile
# OUT/stages.txt has each stage's exit status and seconds (and why a requested analysis was
# skipped, which makes the script's exit status non-zero).
# Training keeps its state in OUT/train_state.pt and resumes from it, so running the same
# command again continues a run that was killed or preempted (train.log and the other logs are
# appended to, not overwritten). A budget longer than one job or call, in two calls:
#     bash sbatch/train_deep_tiny.sh OUT --minutes 15 --pause-after 7.5   # stops, state saved
#     bash sbatch/train_deep_tiny.sh OUT --minutes 15                     # goes on, then stages 2-4
# A paused run records "train paused" in stages.txt and runs no other stage; so does a run
# stopped by SIGTERM ("train stopped by SIGTERM", exit status 143: the state is saved at the end
# of the step under way). stages.txt is this call's; the logs keep every call's output.
# As a SLURM job (requeued on preemption, it resumes), submitted from the repository root with the
# cluster's flags (sbatch/cluster.env's account and partition; the job's Python: job_env.sh):
#     sbatch --gres=gpu:1 [--account A --partition P] sbatch/train_deep_tiny.sh OUT
# PACK_TO=DIR (e.g. the device tool's $OUT, which returns at most 8 files of at most 16 MiB):
# after the first card and at the end, OUT is packed into DIR/deep_tiny.tar.NN (15 MiB parts;
# restore with `cat deep_tiny.tar.* | tar -x -C OUT`), with README.md, stages.txt and train.log
# beside the parts for reading.
#SBATCH --job-name=fdllm-deep-tiny
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --time=00:40:00
set -uo pipefail
if [[ $# -lt 1 ]]; then
    echo "usage: bash sbatch/train_deep_tiny.sh OUT [train.py flags]" >&2
    exit 2
fi
RUN="bash sbatch/train_deep_tiny.sh $*"
OUT="$(mkdir -p "$1" && cd "$1" && pwd)"
shift
if [[ -n "${SLURM_JOB_ID:-}" && ! -f "$(dirname "$0")/job_env.sh" ]]; then
    # sbatch runs a copy of this script from its spool: cd to where it was submitted
    cd "${SLURM_SUBMIT_DIR}"
    if [[ ! -f sbatch/job_env.sh ]]; then
        echo "submit from the repository root (no sbatch/job_env.sh in ${PWD})" >&2
        exit 2
    fi
    source sbatch/job_env.sh
    PY="${PYTHON:-${FDLLM_JOB_PYTHON}}"
else
    cd "$(dirname "$0")/.."
    PY="${PYTHON:-python}"
fi
CKPT="${OUT}/checkpoint"
ANALYZE_N="${ANALYZE_N:-64}"
ANALYZE_ARGS=()
if [[ " $* " == *" --smoke "* ]]; then
    ANALYZE_N="${ANALYZE_N_SMOKE:-4}"
    ANALYZE_ARGS=(--max-new-tokens 64)
fi
COMMIT="${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
START=$(date +%s)
DEADLINE_S="${DEADLINE_S:-575}"
: >"${OUT}/stages.txt"

# On SIGTERM (preemption, requeue, time limit) this script waits for the stage under way: the
# training saves its state at the end of its step and exits 143, recorded below.
trap 'echo "== SIGTERM: waiting for the stage under way" >&2' TERM
LAST_RC=0
stage() {  # stage NAME LOG COMMAND...: run, tee the output into OUT/LOG, record status and time
    local name=$1 log=$2 start
    shift 2
    start=$(date +%s)
    echo "== ${name} ($(date -u +%H:%M:%S) UTC): $*"
    # tee ignores SIGTERM: it keeps the log (and the training's stdout) open while the training
    # saves its state on SIGTERM; a tee killed first would end the training on a broken pipe
    "$@" 2>&1 | (trap '' TERM && exec tee -a "${OUT}/${log}")
    LAST_RC=${PIPESTATUS[0]}
    echo "${name} rc=${LAST_RC} seconds=$(($(date +%s) - start))" | tee -a "${OUT}/stages.txt"
}

pack() {
    [[ -n "${PACK_TO:-}" ]] || return 0
    mkdir -p "${PACK_TO}"
    rm -f "${PACK_TO}"/deep_tiny.tar.*
    tar -cf - --exclude=./train_state.pt --exclude=./train_state.pt.tmp -C "${OUT}" . |
        split -b 15m -d - "${PACK_TO}/deep_tiny.tar."
    cp "${OUT}/stages.txt" "${OUT}/train.log" "${PACK_TO}/" 2>/dev/null
    cp "${CKPT}/README.md" "${PACK_TO}/" 2>/dev/null
    echo "packed ${OUT} into ${PACK_TO}: $(cd "${PACK_TO}" && echo deep_tiny.tar.*)"
}

card() {
    if [[ -f "${CKPT}/train_log.json" ]]; then
        stage card card.log "${PY}" -u -m v2.tiny.card "${CKPT}" --commit "${COMMIT}" \
            --run "${RUN}"
    fi
}

# train.log is appended to: this call's lines are those after SEEN
SEEN=$(cat "${OUT}/train.log" 2>/dev/null | wc -l)
stage train train.log "${PY}" -u -m v2.tiny.train --task hard --arch deep --minutes 7.5 \
    --compile --out "${CKPT}" --state "${OUT}/train_state.pt" --resume "$@"
if [[ ${LAST_RC} == 143 ]]; then  # SIGTERM (preemption, requeue, time limit): state saved
    echo "train stopped by SIGTERM: the same command goes on" | tee -a "${OUT}/stages.txt"
    pack
    exit 143
fi
if [[ ${LAST_RC} == 0 ]] && tail -n "+$((SEEN + 1))" "${OUT}/train.log" | grep -q "^paused at"; then
    echo "train paused: the same command without --pause-after goes on" | tee -a "${OUT}/stages.txt"
    pack
    exit 0
fi
card
pack
LEFT=$((DEADLINE_S - ($(date +%s) - START)))
if [[ "${ANALYZE:-0}" != 1 ]]; then
    echo "analyze off (ANALYZE=1 runs it): python -m v2.analyze --model ${CKPT} ..."
elif [[ -f "${CKPT}/config.json" && ${LEFT} -ge 20 ]]; then
    if [[ ${LEFT} -lt 60 ]]; then
        ANALYZE_N=$((ANALYZE_N < 16 ? ANALYZE_N : 16))
    fi
    stage analyze analyze.log timeout "${LEFT}" "${PY}" -u -m v2.analyze --model "${CKPT}" \
        --task tiny_gsm_hard --n "${ANALYZE_N}" --chat --threshold 0.9 --out "${CKPT}/analysis" \
        "${ANALYZE_ARGS[@]}"
    card
elif [[ -f "${CKPT}/config.json" ]]; then
    echo "analyze skipped: ${LEFT} s left before DEADLINE_S" | tee -a "${OUT}/stages.txt"
else
    echo "analyze skipped: no checkpoint" | tee -a "${OUT}/stages.txt"
fi
pack
cat "${OUT}/stages.txt"
! grep -qv "rc=0" "${OUT}/stages.txt"

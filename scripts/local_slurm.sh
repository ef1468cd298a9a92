#!/usr/bin/env bash
# A single-node Slurm on this machine (slurmctld + slurmd on localhost, munge for auth),
# for the Slurm tests and for trying `snakemake --profile slurm` without a cluster.
#
#   sudo scripts/local_slurm.sh start   # writes $CFS_SLURM_DIR/slurm.conf, starts the daemons
#   sudo scripts/local_slurm.sh stop    # stops what `start` started (munged only if it did)
#   scripts/local_slurm.sh env          # the variables clients need: eval "$(... env)"
#
# Needs root and Debian's `slurm-wlm` and `munge` (apt-get install slurm-wlm munge).
# Environment: CFS_SLURM_DIR (state, logs, config; default /tmp/cfs-slurm),
# CFS_SLURM_PORT (slurmctld port, slurmd uses the next one; default 16817, away from a real
# Slurm's 6817), CFS_SLURM_GPUS (GPUs the node advertises, default 0: with N > 0 the node
# claims N GPUs without device files, enough to schedule `--gpus` jobs on a CPU machine).
# Accounting is off, so job status comes from squeue: MinJobAge keeps finished jobs in
# squeue for 10 minutes and `env` prints CFS_SLURM_STATUS_COMMAND=squeue for the profile.
# /etc/slurm/slurm.conf becomes a link to the config written here (`srun` inside a job
# reads the default path: the Slurm executor's job step drops SLURM_CONF); `start` refuses
# to replace a config it did not write, and `stop` removes the link.
set -euo pipefail

DIR=${CFS_SLURM_DIR:-/tmp/cfs-slurm}
PORT=${CFS_SLURM_PORT:-16817}
GPUS=${CFS_SLURM_GPUS:-0}
CONF=$DIR/slurm.conf
SYSTEM_CONF=/etc/slurm/slurm.conf
MARK="# written by scripts/local_slurm.sh"
NODE=localhost

say() { echo "local_slurm: $*" >&2; }
die() { say "$*"; exit 1; }

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

print_env() {
    echo "export SLURM_CONF=$CONF"
    echo "export CFS_SLURM_STATUS_COMMAND=squeue"
    # the advertised GPUs are not real: the stages run their GPU jobs on the CPU
    if [ "$GPUS" -gt 0 ]; then echo "export CFS_GPUS_ON_CPU=1"; fi
}

start_munge() {
    if munge_works; then
        say "munged already running"
        return
    fi
    [ -s /etc/munge/munge.key ] || runuser -u munge -- mungekey --create --force
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    runuser -u munge -- /usr/sbin/munged
    touch "$DIR/started-munged"
    for _ in $(seq 50); do munge_works && return; sleep 0.1; done
    die "munged did not come up"
}

write_conf() {
    local hardware memory gres_line=""
    # the node as slurmd sees it (CPUs, sockets, cores, threads), less a memory margin so
    # the node is never "low on memory"; `nproc` would follow OMP_NUM_THREADS
    hardware=$(slurmd -C | head -n 1 | sed -e 's/^NodeName=[^ ]* //' -e 's/ *RealMemory=[0-9]*//')
    memory=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    memory=$((memory * 9 / 10))
    if [ "$GPUS" -gt 0 ]; then
        # GPUs without devices: terminals stand in for /dev/nvidia*, enough for scheduling
        gres_line="Gres=gpu:$GPUS"
        echo "NodeName=$NODE Name=gpu File=/dev/tty[0-$((GPUS - 1))]" > "$DIR/gres.conf"
    fi
    cat > "$CONF" <<CONF
$MARK
ClusterName=cfs
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
$([ "$GPUS" -gt 0 ] && echo "GresTypes=gpu")
# finished jobs stay visible to squeue (the executor's status command without accounting)
MinJobAge=600
ReturnToService=2
SchedulerParameters=sched_interval=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$NODE NodeAddr=127.0.0.1 $hardware RealMemory=$memory $gres_line State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
}

start() {
    [ "$(id -u)" = 0 ] || die "needs root (slurmd runs jobs as their users)"
    for binary in slurmctld slurmd munged sbatch squeue scontrol; do
        command -v "$binary" >/dev/null || die "no $binary: apt-get install slurm-wlm munge"
    done
    export SLURM_CONF=$CONF
    if [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null \
        && scontrol ping >/dev/null 2>&1; then
        say "already running ($CONF)"
        print_env
        return
    fi
    if [ -e "$SYSTEM_CONF" ] && ! grep -qxF "$MARK" "$SYSTEM_CONF" 2>/dev/null; then
        die "$SYSTEM_CONF exists and was not written by this script: not replacing it"
    fi
    mkdir -p "$DIR/state" "$DIR/spool" "$(dirname "$SYSTEM_CONF")"
    start_munge
    write_conf
    ln -sfn "$CONF" "$SYSTEM_CONF"
    slurmctld -f "$CONF" -i
    slurmd -f "$CONF" -N "$NODE"
    for _ in $(seq 100); do
        if sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
            say "up: $(sinfo -h -N -o '%N %T %c CPUs %m MB')"
            print_env
            return
        fi
        sleep 0.2
    done
    tail -n 20 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
    die "the node did not become idle"
}

stop_pidfile() {
    local pidfile=$1 pid
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

stop() {
    export SLURM_CONF=$CONF
    if [ -f "$CONF" ] && command -v scancel >/dev/null; then
        scancel --full --quiet --user "$(id -un)" 2>/dev/null || true
    fi
    stop_pidfile "$DIR/slurmd.pid"
    stop_pidfile "$DIR/slurmctld.pid"
    if [ "$(readlink "$SYSTEM_CONF" 2>/dev/null)" = "$CONF" ]; then
        rm -f "$SYSTEM_CONF"
    fi
    if [ -f "$DIR/started-munged" ]; then
        stop_pidfile /run/munge/munged.pid
        rm -f "$DIR/started-munged"
    fi
    say "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    env) print_env ;;
    *) die "usage: $0 start|stop|env" ;;
esac

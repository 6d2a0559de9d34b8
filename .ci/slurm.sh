#!/usr/bin/env bash
# A one-node SLURM cluster on this machine for the tests (tests/test_slurm.py; DESIGN.md, decision 1):
# Debian's slurm-wlm and munge, slurmctld and slurmd both on this host, run as root. Idempotent: it installs
# what is missing, rewrites the configuration only when it changed, starts only the daemons that are not
# running, and returns once `sinfo` shows the node idle (or mixed/allocated: jobs running).
#
#   .ci/slurm.sh            install, configure, start; exit 0 when the node takes jobs
#   .ci/slurm.sh --check    exit 0 if it takes jobs now, 1 if not (changes nothing)
#   .ci/slurm.sh --stop     stop the daemons it started (the packages and files stay)
#
# Needs root and Debian's package archive. What it sets: /etc/munge/munge.key (munge:munge, 0400; munged runs as
# user munge), /etc/slurm/slurm.conf (SlurmctldHost=<hostname>, SlurmUser=root, ProctrackType=proctrack/linuxproc,
# TaskPlugin=task/none, SelectType=select/cons_tres with CR_Core, one node of this machine's CPUs and memory,
# one default partition "debug"; no GRES, no accounting). State and logs: /var/spool/slurmctld, /var/spool/slurmd,
# /var/log/slurm.
set -euo pipefail

host="$(hostname -s)"
conf=/etc/slurm/slurm.conf
log=/var/log/slurm

takes_jobs() {  # the controller answers and the node is idle, mixed or allocated
    command -v sinfo > /dev/null || return 1
    local state
    state="$(timeout 10 sinfo -h -n "$host" -o '%t' 2> /dev/null | head -n 1)" || return 1
    [[ "$state" =~ ^(idle|mix|alloc|comp)$ ]]
}

running() { pgrep -x "$1" > /dev/null 2>&1; }

if [[ "${1:-}" == "--check" ]]; then
    takes_jobs
    exit $?
fi
if [[ "${1:-}" == "--stop" ]]; then
    for d in slurmd slurmctld munged; do
        pid="$(pgrep -x "$d" | head -n 1 || true)"
        [[ -n "$pid" ]] && kill "$pid" && echo "slurm.sh: stopped $d ($pid)"
    done
    exit 0
fi

if [[ "$(id -u)" != 0 ]]; then
    echo "slurm.sh: needs root (apt-get, munged as user munge, slurmd)" >&2
    exit 1
fi

# ---------------------------------------------------------------- packages
if ! command -v slurmctld > /dev/null || ! command -v slurmd > /dev/null || ! command -v munged > /dev/null \
        || ! command -v srun > /dev/null; then
    echo "slurm.sh: installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q > /dev/null
    apt-get install -y -q --no-install-recommends slurm-wlm munge > /dev/null
fi

# ---------------------------------------------------------------- munge
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! running munged; then
    runuser -u munge -- /usr/sbin/munged
fi
for _ in $(seq 50); do munge -n 2> /dev/null | unmunge > /dev/null 2>&1 && break; sleep 0.1; done
munge -n | unmunge > /dev/null || { echo "slurm.sh: munged does not answer (/var/log/munge/munged.log)" >&2; exit 1; }

# ---------------------------------------------------------------- slurm.conf
cpus="$(nproc --all)"
mem_mb="$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)"
real_mb=$(( mem_mb * 9 / 10 ))  # a margin: slurmd drains a node that reports less than RealMemory
install -d -m 0755 /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$log"
new="$(mktemp)"
cat > "$new" <<EOF
# Written by .ci/slurm.sh: a one-node test cluster (slurmctld and slurmd on this host, as root).
ClusterName=vision-train-ci
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
KillWait=10
# A job step whose task is killed (kill -9) ends the step's other tasks after this many seconds (srun --kill-on-bad-exit
# ends them at once); the run's own heartbeats end them first (vision_train.parallel).
MessageTimeout=20
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$log/slurmctld.log
SlurmdLogFile=$log/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
changed=0
if ! cmp -s "$new" "$conf"; then
    install -m 0644 "$new" "$conf"
    changed=1
fi
rm -f "$new"

# ---------------------------------------------------------------- daemons
if [[ $changed == 1 ]]; then  # a new configuration: restart what runs with the old one
    for d in slurmd slurmctld; do
        pid="$(pgrep -x "$d" | head -n 1 || true)"
        if [[ -n "$pid" ]]; then
            kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2> /dev/null || break; sleep 0.1; done
        fi
    done
fi
running slurmctld || slurmctld
for _ in $(seq 100); do timeout 5 scontrol ping 2> /dev/null | grep -q "is UP" && break; sleep 0.1; done
running slurmd || slurmd

for i in $(seq 120); do
    takes_jobs && break
    state="$(timeout 10 sinfo -h -n "$host" -o '%t' 2> /dev/null | head -n 1 || true)"
    if [[ "$state" =~ ^(down|drain|drng|fail) ]] && (( i % 10 == 0 )); then  # e.g. down after an unclean stop
        scontrol update NodeName="$host" State=RESUME 2> /dev/null || true
    fi
    sleep 0.5
done
if ! takes_jobs; then
    echo "slurm.sh: the node is not idle after 60 s: $(sinfo -h -N -o '%N %t %E' 2>&1 | head -n 3)" \
         "(logs: $log/slurmctld.log, $log/slurmd.log)" >&2
    exit 1
fi
echo "slurm.sh: $(sinfo -h -o 'partition %P, node %N: %t, %c CPUs, %m MB' | head -n 1)"

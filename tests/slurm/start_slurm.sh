#!/usr/bin/env bash
# Start a single-node SLURM on this machine for the `slurm` test tier (tests/slurm/): munge,
# slurmctld and slurmd as root, the node's real CPUs and memory (`slurmd -C`), two fake GPUs
# (character devices in /run) and fast requeue settings. Idempotent: a scheduler already up is
# left alone. Facts behind each setting: ../shared/SLURM.md of the project notes (Debian slurm-wlm 22.05).
#   tests/slurm/start_slurm.sh          start (exit 0 when the node answers)
#   tests/slurm/start_slurm.sh --stop   stop the daemons this script started (by their pid files)
# Exit codes: 0 up, 2 cannot run here (not root, packages missing), 1 the daemons did not come up.
set -uo pipefail

STATE=/var/spool/cc-slurm
CONF_DIR=/etc/slurm
PIDS=(/run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid)

alive() {  # a pid file naming a live process (a zombie is dead: PID 1 reaps late here)
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -d "/proc/$pid" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null
}

stop() {
  # the test cluster's jobs first (their slurmstepd and tasks would outlive slurmd), then the daemons
  if alive /run/slurmctld.pid && scontrol show config 2>/dev/null | grep -Eq '^ClusterName *= *cc-test$'; then
    scancel --quiet --user="$(id -un)" 2>/dev/null
    for _ in $(seq 60); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
  fi
  for f in "${PIDS[@]}"; do
    if alive "$f"; then kill "$(cat "$f")" 2>/dev/null; fi
  done
  for _ in $(seq 50); do
    local any=0
    for f in "${PIDS[@]}"; do alive "$f" && any=1; done
    [ "$any" = 0 ] && break
    sleep 0.2
  done
  for f in "${PIDS[@]}"; do
    if alive "$f"; then kill -9 "$(cat "$f")" 2>/dev/null; fi
    rm -f "$f"
  done
  echo "slurm: stopped"
}

if [ "${1:-}" = "--stop" ]; then stop; exit 0; fi

if [ "$(id -u)" != 0 ]; then echo "slurm: not started: needs root (daemons, /etc/slurm, mknod)" >&2; exit 2; fi
for tool in munged slurmctld slurmd sbatch squeue sinfo scontrol; do
  if ! command -v "$tool" >/dev/null; then
    echo "slurm: not started: $tool not installed (apt-get install -y slurm-wlm munge)" >&2; exit 2
  fi
done

node_up() { sinfo -h -N -o '%T' 2>/dev/null | grep -Eq '^(idle|mixed|allocated|completing)'; }
if alive /run/slurmctld.pid && alive /run/slurmd.pid && node_up; then echo "slurm: already up"; exit 0; fi
stop >/dev/null

host=$(hostname -s)
# munge: the key Debian made at install, else a new one
mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
if [ ! -s /etc/munge/munge.key ]; then mungekey --create --keyfile=/etc/munge/munge.key || exit 1; fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
su -s /bin/sh munge -c munged || { echo "slurm: munged did not start" >&2; exit 1; }

# two fake GPUs: SLURM 22.05 needs a character device per GPU (File=); /run is a tmpfs, so at every start
for i in 0 1; do [ -c "/run/fake-gpu$i" ] || mknod -m 0666 "/run/fake-gpu$i" c 1 3; done

read -r cpus sockets cores threads mem < <(slurmd -C | awk '/^NodeName/ {
  for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
  print v["CPUs"], v["SocketsPerBoard"], v["CoresPerSocket"], v["ThreadsPerCore"], v["RealMemory"] }')
mem=$((mem * 9 / 10))                      # a little below what slurmd measures
mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/d" /var/log/slurm
cat > "$CONF_DIR/slurm.conf" <<CONF
# written by tests/slurm/start_slurm.sh: a single-node test cluster
ClusterName=cc-test
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# a requeued job may start again after cred_expire (about 12 s here with 10, 35-40 s with 30, 145 s by default)
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$((mem / (cpus > 0 ? cpus : 1) / 2))
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SchedulerParameters=sched_interval=5,bf_interval=5
MinJobAge=600
KillWait=5
GresTypes=gpu
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus Sockets=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
echo "Name=gpu File=/run/fake-gpu[0-1]" > "$CONF_DIR/gres.conf"
rm -f "$CONF_DIR/cgroup.conf"              # none: slurmd 22.05 autodetects (CgroupPlugin=disabled makes it exit)

slurmctld || { echo "slurm: slurmctld did not start (see /var/log/slurm/slurmctld.log)" >&2; exit 1; }
slurmd || { echo "slurm: slurmd did not start (see /var/log/slurm/slurmd.log)" >&2; exit 1; }
for _ in $(seq 60); do
  if node_up; then echo "slurm: up ($host: $cpus CPUs, ${mem} MB, 2 fake GPUs)"; exit 0; fi
  sleep 0.5
done
scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1
sleep 1
if node_up; then echo "slurm: up ($host: $cpus CPUs, ${mem} MB, 2 fake GPUs)"; exit 0; fi
echo "slurm: the node did not come up: $(sinfo -h -N -o '%T %E' 2>&1 | head -1) (see /var/log/slurm/)" >&2
exit 1

#!/usr/bin/env bash
# A real one-node Slurm on this machine, for the tests marked `slurm`:
#   tests/integration/slurm/cluster.sh start    # installs slurm-wlm + munge if missing (root), starts daemons
#   tests/integration/slurm/cluster.sh stop
# Prints `export SLURM_CONF=...` on start.
# The one real node declares 8 GPUs backed by plain files, so templates asking --gres=gpu:8
# run on it; eight more nodes (sim[1-8], this host's address) sit in the `sizing` partition
# only, so that `sbatch --test-only` accepts the 8-node templates; no job step runs there.
set -euo pipefail
ROOT=${SCALING_SLURM_ROOT:-/tmp/scaling-slurm}
CONF=$ROOT/slurm.conf

install_slurm() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return
  if [ "$(id -u)" != 0 ]; then echo "Slurm is not installed; run as root or: apt-get install slurm-wlm munge" >&2; exit 1; fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

start() {
  install_slurm
  stop >/dev/null 2>&1 || true
  mkdir -p "$ROOT"/{state,spool,log} /run/munge /var/log/munge /var/lib/munge
  host=$(hostname -s)
  for i in 0 1 2 3 4 5 6 7; do touch "$ROOT/gpu$i"; done
  [ -s /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; }
  chmod 400 /etc/munge/munge.key
  cat > "$CONF" <<CONF
ClusterName=scalingtest
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool
SlurmctldPidFile=$ROOT/slurmctld.pid
SlurmdPidFile=$ROOT/slurmd.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
SchedulerParameters=defer
MinJobAge=600
GresTypes=gpu
NodeName=$host CPUs=$(nproc) Gres=gpu:8 State=UNKNOWN
NodeName=sim[1-8] NodeHostname=$host NodeAddr=127.0.0.1 CPUs=96 Gres=gpu:8 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
PartitionName=sizing Nodes=sim[1-8] MaxTime=INFINITE State=UP
CONF
  cat > "$ROOT/gres.conf" <<CONF
NodeName=$host,sim[1-8] Name=gpu File=$ROOT/gpu[0-7]
CONF
  munged --force
  slurmctld -f "$CONF"
  slurmd -f "$CONF"
  export SLURM_CONF=$CONF
  # Up when every node, the simulated ones too (they register through this host's slurmd, which
  # takes a few seconds), is idle.
  for _ in $(seq 120); do
    states=$(sinfo -h -N -o %t 2>/dev/null || true)
    [ -n "$states" ] && ! grep -qv '^idle' <<< "$states" && { echo "export SLURM_CONF=$CONF"; return; }
    sleep 1
  done
  echo "Slurm did not come up; see $ROOT/log/" >&2; exit 1
}

stop() {
  for f in "$ROOT/slurmd.pid" "$ROOT/slurmctld.pid"; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
  pkill -x slurmd 2>/dev/null || true; pkill -x slurmctld 2>/dev/null || true
}

case ${1:-start} in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac

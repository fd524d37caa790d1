#!/usr/bin/env bash
# A real Slurm cluster on this one machine, for trying the templates and for the test suite:
# slurmctld, munged and N slurmd daemons (nodes n1..nN, all at 127.0.0.1, each on its own port),
# from Debian's packages (installed with apt-get when missing). Needs root; no systemd.
#
#   slurm/local-cluster.sh up      start (or keep) the cluster and wait until its nodes are idle
#   slurm/local-cluster.sh down    cancel all jobs and stop the daemons
#   slurm/local-cluster.sh status  exit 0 if the controller answers
#
# Environment: FTLAB_SLURM_NODES (default 2), FTLAB_SLURM_CPUS (CPUs per node, default: all of this
# machine's), FTLAB_SLURM_PARTITION (default debug).
#
# Everything it writes carries the marker below, so `down` only removes what `up` wrote.
set -euo pipefail

NODES=${FTLAB_SLURM_NODES:-2}
CPUS=${FTLAB_SLURM_CPUS:-$(nproc)}
PARTITION=${FTLAB_SLURM_PARTITION:-debug}
MEM_MB=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) * 3 / 4 / NODES ))
CONF=/etc/slurm/slurm.conf
STATE=/var/spool/slurmctld
LOGS=/var/log/slurm
MARK="# ftlab-local-cluster"
PORT0=17000

log() { echo "[local-cluster] $*"; }
die() { echo "[local-cluster] error: $*" >&2; exit 1; }

# running PIDFILE NAME: the pid in PIDFILE is a live process called NAME
running() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] \
    && ! grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null
}

stop() {  # stop PIDFILE NAME: TERM, wait up to 10 s, then KILL
  running "$1" "$2" || { rm -f "$1"; return 0; }
  local pid; pid=$(cat "$1")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do running "$1" "$2" || break; sleep 0.2; done
  running "$1" "$2" && kill -9 "$pid" 2>/dev/null || true
  rm -f "$1"
}

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null && return 0
  command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get to install it"
  log "installing slurmctld slurmd slurm-client munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

write_config() {  # prints 1 when the config changed
  local new; new=$(mktemp)
  {
    echo "$MARK: written by slurm/local-cluster.sh"
    echo "ClusterName=ftlab-local"
    echo "SlurmctldHost=$(hostname -s)(127.0.0.1)"
    echo "SlurmUser=slurm"
    echo "SlurmdUser=root"
    echo "AuthType=auth/munge"
    echo "CredType=cred/munge"
    # a requeued job may start again cred_expire+1 s after it ended (the default, 120 s, is a long wait)
    echo "AuthInfo=cred_expire=10"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "MpiDefault=none"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "AccountingStorageType=accounting_storage/none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_Core"
    echo "SchedulerParameters=bf_interval=2,sched_interval=2"
    # nodes may advertise more CPUs than this machine has; no node is drained for it
    echo "SlurmdParameters=config_overrides"
    echo "ReturnToService=2"
    echo "KillWait=10"
    echo "MinJobAge=3600"
    echo "MailProg=/bin/true"
    echo "StateSaveLocation=$STATE"
    echo "SlurmdSpoolDir=/var/spool/slurmd-%n"
    echo "SlurmctldPidFile=/run/slurmctld.pid"
    echo "SlurmdPidFile=/run/slurmd-%n.pid"
    echo "SlurmctldLogFile=$LOGS/slurmctld.log"
    echo "SlurmdLogFile=$LOGS/slurmd-%n.log"
    for i in $(seq 1 "$NODES"); do
      echo "NodeName=n$i NodeAddr=127.0.0.1 Port=$((PORT0 + i)) CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN"
    done
    echo "PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  } > "$new"
  mkdir -p /etc/slurm
  if cmp -s "$new" "$CONF"; then rm -f "$new"; echo 0; return; fi
  if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    rm -f "$new"; die "$CONF exists and was not written by this script; not touching a real cluster's config"
  fi
  install -m 0644 "$new" "$CONF"; rm -f "$new"; echo 1
}

resolve_node_names() {
  # Lightning takes the first host of SLURM_NODELIST as the rendezvous address: n1.. must resolve.
  local line
  line="127.0.0.1 $(seq -f 'n%g' -s ' ' 1 "$NODES")"
  getent hosts "$(hostname -s)" >/dev/null || line="$line $(hostname -s)"
  line="$line $MARK"
  grep -qxF "$line" /etc/hosts && return 0
  # rewrite in place: /etc/hosts is often a bind mount that cannot be replaced
  { grep -vF "$MARK" /etc/hosts || true; echo "$line"; } > /tmp/ftlab-hosts.$$
  cat /tmp/ftlab-hosts.$$ > /etc/hosts; rm -f /tmp/ftlab-hosts.$$
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key --force
    chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  if ! running /run/munge/munged.pid munged; then
    rm -f /run/munge/munge.socket.2*
    runuser -u munge -- /usr/sbin/munged
  fi
  for _ in $(seq 50); do munge -n </dev/null | unmunge >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "munge does not work (see /var/log/munge/munged.log)"
}

up() {
  [ "$(id -u)" = 0 ] || die "needs root (it starts system daemons)"
  install_packages
  mkdir -p "$STATE" "$LOGS"; chown slurm:slurm "$STATE" "$LOGS"
  local changed; changed=$(write_config)
  resolve_node_names
  start_munge
  local clear=""
  if [ "$changed" = 1 ]; then  # new shape: restart from a clean state
    for pidfile in /run/slurmd-n*.pid; do [ -e "$pidfile" ] && stop "$pidfile" slurmd; done
    stop /run/slurmctld.pid slurmctld
    rm -rf "${STATE:?}"/* /var/spool/slurmd-n*
    clear="-c"
  fi
  running /run/slurmctld.pid slurmctld || slurmctld $clear || die "slurmctld failed: $(tail -3 "$LOGS/slurmctld.log")"
  local since; since=$(date +%s)
  for i in $(seq 1 "$NODES"); do
    running "/run/slurmd-n$i.pid" slurmd && continue
    mkdir -p "/var/spool/slurmd-n$i"
    slurmd -N "n$i" || die "slurmd n$i failed: $(tail -3 "$LOGS/slurmd-n$i.log")"
  done
  for _ in $(seq 300); do
    local states; states=$(sinfo -h -N -p "$PARTITION" -o '%t' 2>/dev/null | sort -u | tr '\n' ' ')
    if [ -n "$states" ] && ! echo "$states" | grep -qvE '^((idle|alloc|mix|comp) ?)+$'; then
      log "ready in $(( $(date +%s) - since )) s: $(sinfo -h -N -o '%N=%t' | tr '\n' ' ')"
      return 0
    fi
    sleep 0.2
  done
  sinfo -N -l >&2 || true
  die "nodes not idle after 60 s (see $LOGS)"
}

down() {
  if running /run/slurmctld.pid slurmctld; then
    local jobs; jobs=$(squeue -h -o %i | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
      log "cancelling jobs $jobs"
      # shellcheck disable=SC2086  # a list of job ids
      scancel $jobs || true
      for _ in $(seq 100); do [ -z "$(squeue -h -o %i)" ] && break; sleep 0.2; done
    fi
  fi
  for pidfile in /run/slurmd-n*.pid; do [ -e "$pidfile" ] && stop "$pidfile" slurmd; done
  stop /run/slurmctld.pid slurmctld
  stop /run/munge/munged.pid munged
  log "stopped"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) scontrol ping >/dev/null 2>&1 ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# A local 3-node RabbitMQ cluster for development, tests and CI, beside (never touching) the
# machine's own broker rabbit@localhost on 5672.
#
#   bash scripts/cluster.sh start          start mpc1..3@localhost and cluster 2 and 3 into 1
#                                          (idempotent: exits 0 at once when the cluster is up)
#   bash scripts/cluster.sh stop           stop all three and remove their data (exit 0 if none run)
#   bash scripts/cluster.sh status         each node's state and the membership; exit 0 iff all
#                                          three run and are clustered, 1 otherwise
#   bash scripts/cluster.sh kill NODE      kill -9 one node's beam.smp (NODE: 1, 2, 3, mpc1, ...)
#   bash scripts/cluster.sh restart NODE   start a killed node again; it rejoins from its data dir
#   bash scripts/cluster.sh ctl NODE ARGS  rabbitmqctl -n mpcN@localhost ARGS (cluster nodes only)
#
# Nodes mpcN@localhost listen on 127.0.0.1:$((CLUSTER_BASE_PORT+N-1)) (default 5681..5683), their
# Erlang distribution on that port + 20000; their data lives in
# ${CLUSTER_DIR:-${TMPDIR:-/tmp}/messaging-proxy-cluster}/mpcN. They run as the rabbitmq user so
# they share its Erlang cookie with each other and with the CLI. Each node gets its own config and
# env file, so /etc/rabbitmq/rabbitmq.conf (listener on 5672) and /etc/rabbitmq/rabbitmq-env.conf
# (NODENAME=rabbit@localhost) are never read, and every process runs with a clean environment.
# Only the Debian package's rabbitmq-server (3.10 here) is needed. Guest/guest is the only user,
# loopback-only, which is what the tests use.
set -euo pipefail

base_port=${CLUSTER_BASE_PORT:-5681}
dir=${CLUSTER_DIR:-${TMPDIR:-/tmp}/messaging-proxy-cluster}
start_timeout=${CLUSTER_START_TIMEOUT:-120} # seconds, per node, for await_startup
rmq_bin=/usr/lib/rabbitmq/bin
rmq_home=/var/lib/rabbitmq # the rabbitmq user's home, holding the shared .erlang.cookie
lock=$dir.lock
cluster_name=messaging-proxy-cluster # what every node reports as the AMQP server property cluster_name

die() { echo "cluster: $*" >&2; exit 1; }
say() { echo "cluster: $*"; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

[[ $base_port =~ ^[0-9]+$ ]] && [ "$base_port" -ge 1024 ] && [ "$base_port" -le 45530 ] ||
  die "CLUSTER_BASE_PORT must be a number from 1024 to 45530, not '$base_port'"
for p in $base_port $((base_port + 1)) $((base_port + 2)); do
  # Never collide with the machine's own broker (AMQP 5672; distribution 25672 = 5672 + 20000).
  [ "$p" -ne 5672 ] || die "CLUSTER_BASE_PORT=$base_port would use port 5672 of the machine's broker"
done
case $dir in /*) ;; *) dir=$PWD/$dir; lock=$dir.lock ;; esac

name_of() { echo "mpc$1@localhost"; }
port_of() { echo $((base_port + $1 - 1)); }
dist_port_of() { echo $((base_port + $1 - 1 + 20000)); }
dir_of() { echo "$dir/mpc$1"; }

# NODE argument: 1, 2, 3, mpc1, mpc1@localhost ... -> 1..3
node_index() {
  case ${1:-} in
    1 | mpc1 | mpc1@localhost) echo 1 ;;
    2 | mpc2 | mpc2@localhost) echo 2 ;;
    3 | mpc3 | mpc3@localhost) echo 3 ;;
    *) die "unknown node '${1:-}': use 1, 2, 3 or mpc1, mpc2, mpc3" ;;
  esac
}

# Single-quotes one word for /bin/sh.
shq() { local s=${1//\'/\'\\\'\'}; printf "'%s'" "$s"; }

# Runs a command as the rabbitmq user with nothing of the caller's environment (so no RABBITMQ_*
# or ERL_* variable of the caller leaks in), from directory $1; the remaining words may start
# with NAME=VALUE assignments (env(1) syntax). A caller's `local timeout_s=N` bounds it.
timeout_s=
as_rabbitmq_in() {
  local cwd=$1; shift
  local cmd="cd $(shq "$cwd") && exec ${timeout_s:+timeout -k 5 $timeout_s} env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=$rmq_home LANG=C.UTF-8 LC_ALL=C.UTF-8"
  local word
  for word in "$@"; do cmd+=" $(shq "$word")"; done
  # 9>&-: the lock's descriptor must not live on in the detached nodes.
  as_root su rabbitmq -s /bin/sh -c "$cmd" 9>&-
}

# The node's environment: everything rabbitmq-server and rabbitmqctl would otherwise take from
# /etc/rabbitmq points into the node's own directory.
node_env() {
  local n=$1 d; d=$(dir_of "$1")
  echo "RABBITMQ_CONF_ENV_FILE=$d/rabbitmq-env.conf"
  echo "RABBITMQ_CONFIG_FILE=$d/rabbitmq.conf"
  echo "RABBITMQ_ADVANCED_CONFIG_FILE=$d/advanced.config"
  echo "RABBITMQ_NODENAME=$(name_of "$n")"
  echo "RABBITMQ_NODE_IP_ADDRESS=127.0.0.1"
  echo "RABBITMQ_NODE_PORT=$(port_of "$n")"
  echo "RABBITMQ_DIST_PORT=$(dist_port_of "$n")"
  echo "RABBITMQ_MNESIA_BASE=$d/mnesia"
  echo "RABBITMQ_LOG_BASE=$d/log"
  echo "RABBITMQ_PID_FILE=$d/pid"
  echo "RABBITMQ_ENABLED_PLUGINS_FILE=$d/enabled_plugins"
  echo "ERL_CRASH_DUMP=$d/erl_crash.dump"
}

# rabbitmqctl -n mpcN@localhost ARGS..., as the rabbitmq user, reading the node's env file only.
ctl() {
  local n=$1; shift
  as_rabbitmq_in "$rmq_home" "RABBITMQ_CONF_ENV_FILE=$(dir_of "$n")/rabbitmq-env.conf" \
    "$rmq_bin/rabbitmqctl" -n "$(name_of "$n")" "$@"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The pid of node N's beam.smp, if it runs: from its pid file, else (pid file gone, e.g. the data
# dir was removed under a running node) the beam.smp whose environment names the node.
is_beam() { local comm=""; read -r comm 2>/dev/null <"/proc/$1/comm" || true; [ "$comm" = beam.smp ]; }
beam_pid() {
  local n=$1 pid="" p
  read -r pid 2>/dev/null <"$(dir_of "$n")/pid" || true
  if [[ $pid =~ ^[0-9]+$ ]] && is_beam "$pid"; then
    echo "$pid"; return 0
  fi
  for p in /proc/[0-9]*; do
    p=${p#/proc/}
    is_beam "$p" || continue
    if as_root cat "/proc/$p/environ" 2>/dev/null | tr '\0' '\n' | grep -qx "RABBITMQ_NODENAME=$(name_of "$n")"; then
      echo "$p"; return 0
    fi
  done
  return 1
}

# cluster_status of node N as one line of JSON (empty if the node does not answer).
status_json() {
  local timeout_s=60
  ctl "$1" -q cluster_status --formatter json 2>/dev/null || true
}
# A flat array of strings in that JSON, space separated: json_list running_nodes "$json"
json_list() { sed -n "s/.*\"$1\":\[\([^]]*\)\].*/\1/p" <<<"$2" | tr -d '"' | tr ',' ' '; }
json_string() { sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p" <<<"$2"; }
# Running nodes as node N sees them.
running_nodes() { json_list running_nodes "$(status_json "$1")"; }

all_running_in() { # "members" -> true if mpc1..3 are all in it
  local n
  for n in 1 2 3; do [[ " $1 " == *" $(name_of "$n") "* ]] || return 1; done
}

cluster_complete() {
  local n
  for n in 1 2 3; do beam_pid "$n" >/dev/null && port_open "$(port_of "$n")" || return 1; done
  all_running_in "$(running_nodes 1)"
}

node_lines() {
  local n
  for n in 1 2 3; do echo "  $(name_of "$n")  amqp://guest:guest@127.0.0.1:$(port_of "$n")"; done
}

with_lock() {
  mkdir -p "$(dirname "$lock")"
  exec 9>>"$lock"
  flock -w 600 9 || die "another scripts/cluster.sh holds $lock"
}

# Writes node N's directory: mnesia, log, enabled_plugins, its own config and env file.
prepare_node() {
  local n=$1 d; d=$(dir_of "$n")
  mkdir -p "$d/mnesia" "$d/log"
  echo "[]." >"$d/enabled_plugins"
  cat >"$d/rabbitmq.conf" <<EOF
# $(name_of "$n") of the messaging-proxy dev cluster (scripts/cluster.sh): read instead of
# /etc/rabbitmq/rabbitmq.conf, whose listener is the machine's own broker's 5672.
listeners.tcp.1 = 127.0.0.1:$(port_of "$n")
loopback_users.guest = true
log.file.level = info
log.console = false
EOF
  cat >"$d/rabbitmq-env.conf" <<EOF
# $(name_of "$n") of the messaging-proxy dev cluster (scripts/cluster.sh): read instead of
# /etc/rabbitmq/rabbitmq-env.conf, which names the machine's own broker rabbit@localhost.
ERL_EPMD_ADDRESS=127.0.0.1
export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"
EOF
}

launch_node() {
  local n=$1 env_words
  mapfile -t env_words < <(node_env "$n")
  as_rabbitmq_in "$(dir_of "$n")" "${env_words[@]}" "$rmq_bin/rabbitmq-server" -detached
}

# Waits (bounded) until node N's app has started; its beam must stay alive meanwhile.
await_node() {
  local n=$1 deadline=$((SECONDS + start_timeout))
  while [ $SECONDS -lt $deadline ]; do
    local timeout_s=$((deadline - SECONDS + 5))
    ctl "$n" -q await_startup --timeout "$((deadline - SECONDS + 1))" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  return 1
}

node_log_tail() {
  local n=$1 f
  for f in "$(dir_of "$n")/log/$(name_of "$n").log" "$(dir_of "$n")/erl_crash.dump"; do
    [ -f "$f" ] && { echo "--- last lines of $f"; as_root tail -n 25 "$f"; }
  done
  return 0
}

# Node N (per its cluster_status JSON, which lists every running node's listeners) has its AMQP
# listener on 127.0.0.1:<its port>, and no node of the cluster listens on the machine broker's 5672.
check_listeners() {
  local n=$1 json
  json=$2
  [[ $json == *'"interface":"127.0.0.1","node":"'"$(name_of "$n")"'","port":'"$(port_of "$n")"',"protocol":"amqp"'* ]] ||
    die "$(name_of "$n") has no AMQP listener on 127.0.0.1:$(port_of "$n"): $(sed -n 's/.*"listeners":\({[^}]*}\).*/\1/p' <<<"$json")"
  [[ $json != *'"port":5672,'* && $json != *'"port":25672,'* ]] || die "a cluster node listens on a port of the machine's broker (5672/25672)"
}

# Stops node N (rabbitmqctl stop, else kill -9), bounded; prints nothing on success.
stop_node() {
  local n=$1 pid i
  pid=$(beam_pid "$n") || return 0
  local timeout_s=60
  if ! ctl "$n" -q stop "$(dir_of "$n")/pid" >/dev/null 2>&1; then
    as_root kill -9 "$pid" 2>/dev/null || true
  fi
  for i in $(seq 1 100); do [ -d "/proc/$pid" ] || return 0; sleep 0.2; done
  as_root kill -9 "$pid" 2>/dev/null || true
  for i in $(seq 1 50); do [ -d "/proc/$pid" ] || return 0; sleep 0.2; done
  echo "cluster: could not stop $(name_of "$n") (pid $pid)" >&2
  return 1
}

do_stop() {
  local n pids=() stopped=() rc=0
  for n in 1 2 3; do
    if beam_pid "$n" >/dev/null; then
      stopped+=("$(name_of "$n")")
      stop_node "$n" &
      pids+=($!)
    fi
  done
  for n in "${pids[@]}"; do wait "$n" || rc=1; done
  [ $rc -eq 0 ] || die "some node did not stop; data left in $dir"
  as_root rm -rf "$dir"
  if [ ${#stopped[@]} -gt 0 ]; then say "stopped ${stopped[*]}; removed $dir"; else say "no cluster node was running; removed $dir"; fi
}

cmd_start() {
  local t0 n pids=() rc=0 members json
  t0=$(now)
  command -v rabbitmq-server >/dev/null || [ -x "$rmq_bin/rabbitmq-server" ] || die "rabbitmq-server is not installed (apt-get install rabbitmq-server)"
  with_lock
  if cluster_complete; then
    say "cluster already up and complete ($(since "$t0") s):"
    node_lines
    return 0
  fi
  # Leftovers of a previous run (nodes half up, a killed node, stale pids or data): start afresh.
  if [ -e "$dir" ] || beam_pid 1 >/dev/null || beam_pid 2 >/dev/null || beam_pid 3 >/dev/null; then
    say "cleaning up leftovers of a previous run in $dir"
    do_stop
  fi
  for n in 1 2 3; do
    for p in "$(port_of "$n")" "$(dist_port_of "$n")"; do
      ! port_open "$p" || die "port 127.0.0.1:$p is already in use (set CLUSTER_BASE_PORT to move the cluster)"
    done
  done
  for n in 1 2 3; do prepare_node "$n"; done
  as_root chown -R rabbitmq:rabbitmq "$dir"
  as_rabbitmq_in "$rmq_home" test -w "$dir/mpc1/mnesia" || die "the rabbitmq user cannot write $dir (is TMPDIR private? set CLUSTER_DIR)"

  for n in 1 2 3; do
    (launch_node "$n" >"$(dir_of "$n")/start.out" 2>&1 && await_node "$n") &
    pids+=($!)
  done
  for n in 1 2 3; do
    if ! wait "${pids[$((n - 1))]}"; then
      rc=1
      echo "cluster: $(name_of "$n") did not start within ${start_timeout}s" >&2
      cat "$(dir_of "$n")/start.out" >&2 2>/dev/null || true
      node_log_tail "$n" >&2
    fi
  done
  [ $rc -eq 0 ] || die "start failed; 'bash scripts/cluster.sh stop' cleans up"
  say "3 nodes up after $(since "$t0") s; clustering mpc2 and mpc3 into $(name_of 1)"

  # The CLI's output is kept for a failure only: 3.10's start_app after join_cluster logs
  # "Failed to create a tracked connection table for node ...: node_not_running" through the CLI,
  # which is harmless (the tables are created once the node runs).
  local timeout_s=120 out
  for n in 2 3; do
    out=$({ ctl "$n" -q stop_app && ctl "$n" -q join_cluster "$(name_of 1)" && ctl "$n" -q start_app; } 2>&1) ||
      { echo "$out" >&2; node_log_tail "$n" >&2; die "$(name_of "$n") could not join $(name_of 1)"; }
  done
  # 3.10 names a cluster after each node's own name and FQDN (mpc2@host on mpc2) until it is set:
  # one name that every node reports (AMQP server property cluster_name).
  ctl 1 -q set_cluster_name "$cluster_name" >/dev/null || die "set_cluster_name failed"
  json=$(status_json 1)
  members=$(json_list running_nodes "$json")
  all_running_in "$members" || die "cluster_status of $(name_of 1) shows running nodes '$members', not all three"
  for n in 1 2 3; do check_listeners "$n" "$json"; done
  say "cluster $(json_string cluster_name "$json") up: running nodes $members"
  node_lines
  say "started in $(since "$t0") s"
}

cmd_stop() {
  with_lock
  do_stop
}

cmd_status() {
  local n pid ok=0 up=() members="" json
  for n in 1 2 3; do
    if pid=$(beam_pid "$n"); then
      if port_open "$(port_of "$n")"; then
        echo "$(name_of "$n")  127.0.0.1:$(port_of "$n")  running (beam pid $pid)"
        up+=("$n")
      else
        echo "$(name_of "$n")  127.0.0.1:$(port_of "$n")  beam alive (pid $pid) but AMQP port closed (app stopped or booting)"
        ok=1
      fi
    else
      echo "$(name_of "$n")  127.0.0.1:$(port_of "$n")  not running"
      ok=1
    fi
  done
  if [ ${#up[@]} -gt 0 ]; then
    json=$(status_json "${up[0]}")
    members=$(json_list running_nodes "$json")
    echo "cluster $(json_string cluster_name "$json") (as $(name_of "${up[0]}") sees it): members $(json_list disk_nodes "$json"); running ${members:-?}"
    [[ $json == *'"partitions":{}'* || -z $json ]] || echo "partitions: $(sed -n 's/.*"partitions":\({[^}]*}\).*/\1/p' <<<"$json")"
    [[ $json == *'"alarms":[]'* || -z $json ]] || echo "alarms: $(json_list alarms "$json")"
  else
    echo "cluster: no node running"
  fi
  all_running_in "$members" || ok=1
  return $ok
}

cmd_kill() {
  local n pid i
  n=$(node_index "${1:-}")
  with_lock
  if ! pid=$(beam_pid "$n"); then
    say "$(name_of "$n") is not running"
    return 0
  fi
  as_root kill -9 "$pid"
  for i in $(seq 1 150); do
    if ! port_open "$(port_of "$n")" && [ ! -d "/proc/$pid" ]; then
      say "killed $(name_of "$n") (beam pid $pid); port $(port_of "$n") closed"
      return 0
    fi
    sleep 0.2
  done
  die "$(name_of "$n") (pid $pid) still holds port $(port_of "$n") 30 s after kill -9"
}

cmd_restart() {
  local n t0 json
  n=$(node_index "${1:-}")
  t0=$(now)
  with_lock
  if beam_pid "$n" >/dev/null && port_open "$(port_of "$n")"; then
    say "$(name_of "$n") is already running on 127.0.0.1:$(port_of "$n")"
    return 0
  fi
  [ -d "$(dir_of "$n")/mnesia" ] || die "$(name_of "$n") has no data dir $(dir_of "$n"): use 'start'"
  if beam_pid "$n" >/dev/null; then stop_node "$n"; fi # a beam whose app is stopped
  ! port_open "$(port_of "$n")" || die "port $(port_of "$n") is in use by something else"
  as_root rm -f "$(dir_of "$n")/pid"
  launch_node "$n" >"$(dir_of "$n")/start.out" 2>&1 || { cat "$(dir_of "$n")/start.out" >&2; die "could not launch $(name_of "$n")"; }
  if ! await_node "$n"; then
    node_log_tail "$n" >&2
    die "$(name_of "$n") did not start within ${start_timeout}s"
  fi
  json=$(status_json "$n")
  check_listeners "$n" "$json"
  say "$(name_of "$n") up again on 127.0.0.1:$(port_of "$n") after $(since "$t0") s; running nodes: $(json_list running_nodes "$json")"
}

cmd_ctl() {
  local n a
  n=$(node_index "${1:-}"); shift
  for a in "$@"; do
    case $a in -n | --node | -n* | --node=*) die "ctl targets $(name_of "$n") only: no -n/--node" ;; esac
  done
  ctl "$n" "$@"
}

case ${1:-} in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  kill) cmd_kill "${2:-}" ;;
  restart) cmd_restart "${2:-}" ;;
  ctl) shift; cmd_ctl "$@" ;;
  *) echo "usage: $0 start|stop|status|kill NODE|restart NODE|ctl NODE ARGS..." >&2; exit 2 ;;
esac

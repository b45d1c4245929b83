#!/bin/bash
# One 1 GB download with curl through an HTTP listener on 127.0.0.1, for each
# variant in turn, ROUNDS times: download speed and the balancer's CPU time.
#
# usage: bench/slowreaders/throughput.sh ROUNDS [LABEL=PYTHONPATH[:READS] ...]
#   READS: big (64 KB reads always) or small (16 KB reads always), patched in by probe.py
#   default variant: now=<this checkout>
# e.g. an older version: git archive COMMIT twisted_slb | tar -x -C /tmp/old; ... old=/tmp/old
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
PY=${PY:-$root/.venv-test/bin/python}
rounds=${1:?rounds}; shift
variants=("$@"); [ ${#variants[@]} -eq 0 ] && variants=("now=$root")
cd "$here"
$PY bigbackend.py 29301 1073741824 & B=$!
sleep 1
echo "direct from the backend: $(curl -s -o /dev/null -w '%{speed_download}' http://127.0.0.1:29301/ | awk '{printf "%.0f MB/s", $1/1e6}')"
for r in $(seq 1 $rounds); do
  for spec in "${variants[@]}"; do
    label=${spec%%=*}; rest=${spec#*=}; pp=${rest%%:*}; reads=; [ "$rest" != "$pp" ] && reads=${rest#*:}
    READS=$reads PROBE_OUT=/dev/null PYTHONPATH=$pp $PY probe.py -n --pidfile= --logfile=/dev/null slb --config big.toml & S=$!
    for i in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/29380) 2>/dev/null && break; sleep 0.1; done
    c0=$(awk '{print $14+$15}' /proc/$S/stat)
    out=$(curl -s -o /dev/null -w '%{speed_download} %{time_total} %{size_download}' http://127.0.0.1:29380/)
    c1=$(awk '{print $14+$15}' /proc/$S/stat)
    echo "$r $label $out $((c1-c0))" | \
      awk '{printf "%s %-10s %6.0f MB/s %6.2f s %d bytes, balancer CPU %.2f s\n", $1, $2, $3/1e6, $4, $5, $6/100}'
    kill $S; wait $S 2>/dev/null
  done
done
kill $B

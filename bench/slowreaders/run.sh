#!/bin/bash
# 2,000 clients that never read 1 MB responses (slowhttptest -X, from Debian's
# slowhttptest package) against an insert_cookie HTTP listener on 127.0.0.1;
# prints the balancer's resident size before, at the peak, 15 s after, and
# after a malloc_trim(0).  Writes LABEL.* in this directory.
#
# usage: bench/slowreaders/run.sh LABEL [PYTHONPATH of the twisted_slb to run]
# env:   PY  a python with Twisted and twisted_slb's dependencies (default .venv-test/bin/python)
label=${1:?label}; pp=${2:-$(cd "$(dirname "$0")/../.." && pwd)}
here=$(cd "$(dirname "$0")" && pwd)
PY=${PY:-$(cd "$here/../.." && pwd)/.venv-test/bin/python}
cd "$here"
rm -f $label.out $label.out.inuse
$PY backend.py 29201 29202 & B=$!
PROBE_OUT=$here/$label.out PYTHONPATH=$pp $PY probe.py -n --pidfile= --logfile=$here/$label.log slb --config slb.toml & S=$!
sleep 4
rss() { awk '/VmRSS/{print $2}' /proc/$S/status; }
kill -s RTMIN+1 $S; sleep 1
echo "$label before: $(rss) kB"
( for i in $(seq 1 80); do echo "$(date +%s) $(rss)"; kill -s RTMIN+3 $S; sleep 1; done ) > $label.rss &
R=$!
timeout 90 slowhttptest -c 2000 -X -r 400 -w 512 -y 1024 -n 5 -z 32 -k 3 -u http://127.0.0.1:29280/ -p 5 -l 40 \
    > $label.slowhttptest.out 2>&1
echo "$label peak: $(sort -k2 -n $label.rss | tail -1 | cut -d' ' -f2) kB"
sleep 15
echo "$label 15 s after the test: $(rss) kB"
echo "$label client connections left: $(ss -Htn state established '( sport = :29280 )' | wc -l)"
kill -s RTMIN+1 $S; sleep 2
kill -s RTMIN+2 $S; sleep 2
echo "$label after malloc_trim(0): $(rss) kB"
kill $R 2>/dev/null
curl -s -o /dev/null -w "$label a request afterwards: %{http_code} %{size_download} bytes\n" http://127.0.0.1:29280/
echo "$label peak of glibc's bytes in use: $(sort -t= -k3 -n $label.out.inuse | tail -1 | sed 's/.*malloc_in_use=//; s/ .*//') kB"
echo "$label 'failed mid-response' lines: $(grep -c 'failed mid-response' $label.log)"
echo "$label trims logged: $(grep -c 'given back to the system' $label.log)"
kill $S $B; wait $S $B 2>/dev/null

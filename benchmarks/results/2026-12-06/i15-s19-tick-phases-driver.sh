# threads.sh SECONDS MEMTRACE_ARGS... : per-thread CPU of memtrace watch on manymaps 60k refault
SECS=$1; shift
cd /tmp/prof && rm -f fifo && mkfifo fifo
/work/main/benchmarks/workloads/bin/manymaps 60000 18 $((SECS+30)) refault < fifo > wl.out 2>&1 &
exec 7>/tmp/prof/fifo; sleep 6; P=$(pgrep -f "bin/manymaps 60000" | head -1)
cd /work/main
.venv/bin/python benchmarks/tick_phases.py /tmp/prof/timed.txt watch $P --format json --interval 1 --reconcile-interval 0 --no-serve "$@" > /dev/null 2>/tmp/prof/mt.err &
MT=$!
sleep 8; echo -n g >&7; sleep 10; kill -USR1 $MT
snap() { for t in /proc/$MT/task/*; do echo "$(basename $t) $(cat $t/comm) $(awk "{print \$14}" $t/stat) $(awk "{print \$15}" $t/stat)"; done; for c in $(pgrep -P $MT); do echo "child$c $(cat /proc/$c/comm) $(awk '{print $14+$15}' /proc/$c/stat)"; done; }
snap > /tmp/prof/s0; sleep $SECS; snap > /tmp/prof/s1
join /tmp/prof/s0 /tmp/prof/s1 | awk "{print \$1, \$2, \"user\", \$6-\$3, \"sys\", \$7-\$4}"
kill -INT $MT; wait $MT; exec 7>&-; pkill -f "bin/manymaps 60000"

cd /work/main
# /tmp/mx/loop: gcc -O2 -o /tmp/mx/loop benchmarks/workloads/mallocloop.c; usage: bash i13-s24-rates.sh ROUNDS
Q="--format none --no-serve --pss-interval 0 --heap-interval 0"
S=100000000
for r in $(seq 1 $1); do
  echo "bare $(/tmp/mx/loop $S)"
  echo "run $(.venv/bin/memtrace run $Q -- /tmp/mx/loop $S 2>/dev/null | grep -o 'ns_per_pair [0-9.]*')"
  for rate in 10000 2000 500; do echo "r$rate $(.venv/bin/memtrace run --malloc --malloc-max-rate $rate $Q -- /tmp/mx/loop $S 2>/dev/null | grep -o 'ns_per_pair [0-9.]*')"; done
done | awk '{a[$1]=a[$1]" "$3} END{for(k in a) print k, a[k]}' | while read k rest; do echo "$k median $(echo $rest | tr ' ' '\n' | sort -n | awk '{v[NR]=$1; s+=$1} END{printf "%s mean %.3f", (NR%2? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2), s/NR}') : $rest"; done | sort

// tests/root/stacks/test_jit_root.py: JavaScript functions that make pages
// resident, for `memtrace run --stacks` on node. V8 keeps frame pointers in
// its JIT code and builtins (which have no CFI), and --perf-basic-prof
// --interpreted-frames-native-stack names its functions in /tmp/perf-PID.map.
//
//   node --perf-basic-prof --interpreted-frames-native-stack jitstacks.js MIB
//
// fillOutsideTheHeap fills MIB buffers of 1 MiB (their pages are made resident
// by memset under Buffer.prototype.fill) and keeps them; then it prints
// "filled" and waits for its stdin to close.
'use strict';

function fillOutsideTheHeap(mib) {
  const kept = [];
  for (let i = 0; i < mib; i++) {
    const b = Buffer.allocUnsafeSlow(1 << 20);
    b.fill(i + 1);
    kept.push(b);
  }
  return kept;
}

const kept = fillOutsideTheHeap(Number(process.argv[2] || 64));
process.stdout.write(`filled ${kept.length}\n`);
process.stdin.on('data', () => {});
process.stdin.on('end', () => process.exit(0));

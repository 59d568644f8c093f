// tests/root/accuracy/test_real_runtimes.py: Node.js under allocation churn
// (buffers up to 64 KiB and small objects, a tenth kept for a while; V8's GC
// maps, protects and discards its pages) for SECONDS seconds.
//   node nodechurn.js SECONDS
'use strict';
const end = Date.now() + Number(process.argv[2]) * 1000;
let kept = [];
function step() {
  for (let i = 0; i < 2000; i++) {
    const b = Buffer.alloc(Math.floor(Math.random() * 65536));
    const o = {a: i, s: 'x'.repeat(i % 100), arr: new Array(i % 50).fill(i)};
    if (Math.random() < 0.1) kept.push(b, o);
  }
  if (kept.length > 6000) kept = kept.slice(5000);
  if (Date.now() < end) setTimeout(step, 1);
}
step();

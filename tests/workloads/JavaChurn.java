// tests/root/accuracy/test_real_runtimes.py: a JVM under allocation churn (byte
// arrays up to 64 KiB, a tenth of them kept for a while) for SECONDS seconds.
//   javac -d DIR JavaChurn.java && java -XX:+UseZGC -Xmx512m -cp DIR JavaChurn SECONDS
import java.util.ArrayList;
import java.util.List;
import java.util.Random;

public class JavaChurn {
    public static void main(String[] args) throws Exception {
        List<byte[]> kept = new ArrayList<>();
        Random r = new Random(1);
        long end = System.currentTimeMillis() + Long.parseLong(args[0]) * 1000;
        while (System.currentTimeMillis() < end) {
            for (int i = 0; i < 2000; i++) {
                byte[] b = new byte[1 + r.nextInt(64 * 1024)];
                b[0] = 1;
                if (r.nextInt(10) == 0) kept.add(b);
            }
            if (kept.size() > 3000) kept.subList(0, 2500).clear();
            Thread.sleep(1);
        }
    }
}

package integration

// The download path against Google Cloud Storage's JSON API (a loopback
// stand-in, testenv.GCS): objects are checked against their MD5, and
// composite objects, which have none, against their crc32c.

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/modelcache/modelcache/test/testenv"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// A byte flipped in transfer of a GCS object (in every response: in every
// chunk of a ranged download) is refused, naming the checksum it failed:
// the MD5 of a plain object, the crc32c of a composite one (asked of the
// object's metadata, as the listing's MD5 is missing).
// Nothing is kept, and once the network behaves the same publish serves
// byte-exact files.
func TestGCS_ByteFlipped_RefusedByMD5OrCrc32c(t *testing.T) {
	for i, c := range []struct {
		name      string
		composite bool
		args      []string
		says      string
	}{
		{"object with an MD5", false, nil, "MD5"},
		{"composite object, crc32c only", true, nil, "crc32c"},
		{"composite object in ranged chunks", true, rangedArgs, "crc32c"},
	} {
		t.Run(c.name, func(t *testing.T) {
			e := newEnv(t)
			if len(c.args) > 0 {
				e.driver.Stop()
				e.start(c.args...)
			}
			g, err := testenv.StartGCS("models")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(g.Stop)
			files := randomModel(byte(200+i), map[string]int{"config.json": 300, "w.bin": 6<<20 + 7})
			for name, data := range files {
				g.Put("m/"+name, data, c.composite && name == "w.bin")
			}
			secret := map[string]string{
				"RCLONE_CONFIG_MYGCS_TYPE":     "google cloud storage",
				"RCLONE_CONFIG_MYGCS_ENDPOINT": g.Endpoint,
			}
			attrs := map[string]string{"modelUri": "mygcs:models/m"}
			target := e.target("pod")
			g.FlipByte("m/w.bin", 3<<20+5)

			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			err = e.publish(ctx, "vol", target, attrs, secret)
			wantCode(t, err, codes.Unavailable)
			msg := status.Convert(err).Message()
			t.Logf("refused: %s", msg)
			for _, want := range []string{"w.bin", "corrupted", c.says} {
				if !strings.Contains(msg, want) {
					t.Errorf("message %q does not say %q", msg, want)
				}
			}
			nothingKept(t, e, target, files["config.json"], files["w.bin"])

			g.FlipByte("", 0)
			if err := e.publish(ctx, "vol", target, attrs, secret); err != nil {
				t.Fatalf("publish once the network behaves: %v\ndriver logs:\n%s", err, e.driver.Logs())
			}
			sameFiles(t, target, files)
			if ranged := g.RangedGets() > 0; ranged != (len(c.args) > 0) {
				t.Errorf("ranged GETs: %v, want %v", ranged, len(c.args) > 0)
			}
			e.mustUnpublish("vol", target)
		})
	}
}

package testenv

import "testing"

func TestDriverRaces_ReportsBetweenBanners(t *testing.T) {
	report := "WARNING: DATA RACE\nWrite at 0x00c000012345 by goroutine 7:\n  main.f()\n"
	cases := []struct {
		name, logs, want string
	}{
		{"none", "I1207 serving on csi.sock\n", ""},
		{"one", "I1207 a\n" + raceBanner + "\n" + report + raceBanner + "\nI1207 b\n", report + "\n"},
		{"two", raceBanner + "\n" + report + raceBanner + "\nx\n" + raceBanner + "\n" + report + raceBanner + "\n", report + "\n" + report + "\n"},
		{"cut off by a kill", "I1207 a\n" + raceBanner + "\n" + report, report + "\n"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := &Driver{}
			if _, err := (*lockedWriter)(d).Write([]byte(c.logs)); err != nil {
				t.Fatal(err)
			}
			if got := d.Races(); got != c.want {
				t.Fatalf("Races() = %q, want %q", got, c.want)
			}
		})
	}
}

func TestRaceReports_EveryStartedDriver(t *testing.T) {
	a, b := &Driver{}, &Driver{}
	_, _ = (*lockedWriter)(b).Write([]byte(raceBanner + "\nWARNING: DATA RACE\nin b\n" + raceBanner + "\n"))
	saved := started.all
	t.Cleanup(func() { started.all = saved })
	started.all = nil
	started.add(a)
	if got := RaceReports(); got != "" {
		t.Fatalf("RaceReports() with a clean driver = %q, want none", got)
	}
	started.add(b)
	if got, want := RaceReports(), "WARNING: DATA RACE\nin b\n\n"; got != want {
		t.Fatalf("RaceReports() = %q, want %q", got, want)
	}
}

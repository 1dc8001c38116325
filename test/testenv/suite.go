package testenv

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// Suite is what a root test package shares across its tests: a scratch
// directory, the freshly built driver binary and one loopback MinIO.
type Suite struct {
	Dir       string
	DriverBin string
	MinIO     *MinIO
}

// StartSuite checks for root, builds the driver and starts MinIO. what names
// the suite in the error a non-root user sees.
func StartSuite(what string) (*Suite, error) {
	if os.Geteuid() != 0 {
		return nil, fmt.Errorf("%s need root (bind mounts): run them through make as root", what)
	}
	dir, err := os.MkdirTemp("", "modelcache-")
	if err != nil {
		return nil, err
	}
	s := &Suite{Dir: dir}
	if s.DriverBin, err = BuildDriver(dir); err != nil {
		s.Close()
		return nil, err
	}
	if s.MinIO, err = StartMinIO(filepath.Join(dir, "minio")); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// Close stops MinIO and removes the scratch directory.
func (s *Suite) Close() {
	if s.MinIO != nil {
		s.MinIO.Stop()
	}
	_ = os.RemoveAll(s.Dir)
}

// RunSuite is a root test package's TestMain body: it starts a Suite, hands
// it to setup (nil for none), runs the tests and stops the suite, returning
// the exit code: 1 when a driver the tests started reported a data race.
func RunSuite(m *testing.M, what string, setup func(*Suite) error) int {
	s, err := StartSuite(what)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer s.Close()
	if setup != nil {
		if err := setup(s); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
	}
	code := m.Run()
	if races := RaceReports(); races != "" {
		fmt.Fprintf(os.Stderr, "the driver under test reported data races:\n%s", races)
		return 1
	}
	return code
}

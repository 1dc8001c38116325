// Command rclonecli is the rclone CLI as the storage initializer runs it
// (`rclone copy` from S3 to a local directory), at the rclone version
// go.mod pins: test/benchrun's side of each comparison. It links the
// commands and backends the benchmarks run (copy and version; s3 and
// local) rather than all of rclone's, and builds in this module with the
// driver's flags, so that a cold build compiles the packages the two share
// once (540 of its 562; the whole CLI as its own module compiled 1,585).
package main

import (
	"github.com/rclone/rclone/cmd"

	_ "github.com/rclone/rclone/backend/local"
	_ "github.com/rclone/rclone/backend/s3"
	_ "github.com/rclone/rclone/cmd/copy"
	_ "github.com/rclone/rclone/cmd/version"
)

func main() { cmd.Main() }

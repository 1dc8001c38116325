// Package source owns everything about remotes: turning a modelUri and a
// node-publish secret (checked by package remotespec) into an in-memory
// rclone backend configuration, listing a model into a Manifest and opening
// its objects. Nothing here touches the process environment or an rclone
// config file, so requests with different credentials can run at the same
// time.
package source

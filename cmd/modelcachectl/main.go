// Command modelcachectl is the operator CLI of modelcache. It talks to the
// node plugin's admin API, JSON over HTTP on a unix socket that only root
// may open, to list, inspect, prefetch, pin, evict, garbage-collect, drain
// and verify the model cache of the node it runs on.
//
// Usage:
//
//	modelcachectl [--socket PATH] <command> [flags] [args]
//
// The socket defaults to /var/lib/modelcache/admin.sock, or to
// $MODELCACHE_ADMIN_SOCKET when that is set. Exit status is 0 when the
// command did what it was asked, 1 when the operation failed or found
// something wrong (a corrupt blob, an evict refused because pods use the
// model), and 2 on a usage error.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/modelcache/modelcache/pkg/adminapi"
	"golang.org/x/term"
)

// defaultSocket is where the node plugin serves the admin API with its
// default --cache-dir.
const defaultSocket = "/var/lib/modelcache/admin.sock"

// Exit codes.
const (
	exitOK     = 0
	exitFailed = 1
	exitUsage  = 2
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	a := newApp(ctx, os.Stdin, os.Stdout, os.Stderr)
	fd := int(os.Stdout.Fd())
	a.isTTY = func() bool { return term.IsTerminal(fd) }
	a.termWidth = func() int {
		w, _, err := term.GetSize(fd)
		if err != nil {
			return 0
		}
		return w
	}
	code := a.run(os.Args[1:])
	stop()
	os.Exit(code)
}

// app is one invocation: its streams, environment and clock, so tests run
// it in-process.
type app struct {
	ctx            context.Context
	stdin          io.Reader
	stdout, stderr io.Writer
	getenv         func(string) string
	now            func() time.Time
	isTTY          func() bool // stdout is a terminal
	termWidth      func() int  // its columns, 0 when unknown
	progressEvery  time.Duration

	socket string
	cl     *adminapi.Client
}

func newApp(ctx context.Context, stdin io.Reader, stdout, stderr io.Writer) *app {
	return &app{
		ctx:           ctx,
		stdin:         stdin,
		stdout:        stdout,
		stderr:        stderr,
		getenv:        os.Getenv,
		now:           time.Now,
		isTTY:         func() bool { return false },
		termWidth:     func() int { return 0 },
		progressEvery: 5 * time.Second,
	}
}

// command is one subcommand.
type command struct {
	name     string
	synopsis string // after "modelcachectl "
	summary  string // one line for the command list
	help     string // what it does, for -h
	run      func(a *app, cmd *command, args []string) error
}

var commands = []*command{
	cmdLs, cmdInspect, cmdPrefetch, cmdPin, cmdUnpin, cmdEvict,
	cmdGC, cmdDrain, cmdUndrain, cmdVerify, cmdDu,
}

// Errors that say how to exit; what went wrong was already printed.
var (
	errHelp  = errors.New("help requested")
	errUsage = errors.New("usage error")
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func (a *app) defaultSocket() string {
	if s := a.getenv("MODELCACHE_ADMIN_SOCKET"); s != "" {
		return s
	}
	return defaultSocket
}

// run runs one command line (without the program name) and returns the
// exit code.
func (a *app) run(args []string) int {
	a.socket = a.defaultSocket()
	fs := flag.NewFlagSet("modelcachectl", flag.ContinueOnError)
	fs.SetOutput(a.stderr)
	fs.StringVar(&a.socket, "socket", a.socket, "")
	showVersion := fs.Bool("version", false, "")
	fs.Usage = func() { a.usage(a.stderr) }
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK
		}
		return exitUsage
	}
	if *showVersion {
		fmt.Fprintln(a.stdout, "modelcachectl", version)
		return exitOK
	}
	if fs.NArg() == 0 {
		a.usage(a.stderr)
		return exitUsage
	}
	name, rest := fs.Arg(0), fs.Args()[1:]
	if name == "help" {
		return a.help(rest)
	}
	i := slices.IndexFunc(commands, func(c *command) bool { return c.name == name })
	if i < 0 {
		fmt.Fprintf(a.stderr, "modelcachectl: unknown command %q\n\n", name)
		a.usage(a.stderr)
		return exitUsage
	}
	cmd := commands[i]
	err := cmd.run(a, cmd, rest)
	switch {
	case err == nil:
		return exitOK
	case errors.Is(err, errHelp):
		return exitOK
	case errors.Is(err, errUsage):
		return exitUsage
	default:
		// Messages can carry a remote's own words (an S3 error body);
		// they reach the terminal with nothing left to act on it.
		fmt.Fprintf(a.stderr, "modelcachectl %s: %s\n", cmd.name, escapeInvisible(a.explain(err).Error()))
		return exitFailed
	}
}

// help serves "modelcachectl help [command]".
func (a *app) help(args []string) int {
	if len(args) == 0 {
		a.usage(a.stdout)
		return exitOK
	}
	for _, c := range commands {
		if c.name == args[0] {
			fs := a.flagSet(c)
			fs.SetOutput(a.stdout)
			a.commandUsage(a.stdout, c, fs)
			return exitOK
		}
	}
	fmt.Fprintf(a.stderr, "modelcachectl: unknown command %q\n\n", args[0])
	a.usage(a.stderr)
	return exitUsage
}

func (a *app) usage(w io.Writer) {
	fmt.Fprint(w, `modelcachectl manages the model cache of this node through the modelcache
node plugin's admin socket. Run it as root on the node (or in the node
plugin's pod).

Usage:
  modelcachectl [--socket PATH] <command> [flags] [args]

Commands:
`)
	tw := newTable(w)
	for _, c := range commands {
		fmt.Fprintf(tw, "  %s\t%s\n", c.name, c.summary)
	}
	tw.Flush()
	fmt.Fprintf(w, `
Global flags:
  --socket PATH   the node plugin's admin socket (default %s;
                  $MODELCACHE_ADMIN_SOCKET overrides the default)
  --version       print the version and exit

Run 'modelcachectl <command> -h' for what a command does and its flags.
Exit status: 0 done, 1 the operation failed or found something wrong,
2 usage error.
`, a.defaultSocket())
}

// flagSet returns a command's flag set, with --socket accepted after the
// command too.
func (a *app) flagSet(cmd *command) *flag.FlagSet {
	fs := flag.NewFlagSet("modelcachectl "+cmd.name, flag.ContinueOnError)
	fs.SetOutput(a.stderr)
	fs.StringVar(&a.socket, "socket", a.socket, "the node plugin's admin socket")
	fs.Usage = func() { a.commandUsage(fs.Output(), cmd, fs) }
	return fs
}

func (a *app) commandUsage(w io.Writer, cmd *command, fs *flag.FlagSet) {
	fmt.Fprintf(w, "Usage: modelcachectl %s\n\n%s\n", cmd.synopsis, strings.TrimSpace(cmd.help))
	var flags []string
	fs.VisitAll(func(f *flag.Flag) {
		if f.Name == "socket" {
			return
		}
		name, usage := flag.UnquoteUsage(f)
		line := "  --" + f.Name
		if name != "" {
			line += " " + name
		}
		line += "\n      " + usage
		if f.DefValue != "" && f.DefValue != "false" {
			line += fmt.Sprintf(" (default %s)", f.DefValue)
		}
		flags = append(flags, line)
	})
	if len(flags) > 0 {
		fmt.Fprintf(w, "\nFlags:\n%s\n", strings.Join(flags, "\n"))
	}
	fmt.Fprintf(w, "\nGlobal flags:\n  --socket PATH\n      the node plugin's admin socket (default %s)\n", a.defaultSocket())
}

// parse parses a command's flags, which may come before, between or after
// its arguments, and checks the number of arguments.
func (a *app) parse(cmd *command, fs *flag.FlagSet, args []string, minArgs, maxArgs int) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, errHelp
			}
			return nil, errUsage // flag printed the error and the usage
		}
		rest := fs.Args()
		consumed := args[:len(args)-len(rest)]
		if len(consumed) > 0 && consumed[len(consumed)-1] == "--" {
			pos = append(pos, rest...)
			break
		}
		if len(rest) == 0 {
			break
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
	switch {
	case len(pos) < minArgs:
		return nil, a.usageError(cmd, "missing argument")
	case len(pos) > maxArgs:
		return nil, a.usageError(cmd, fmt.Sprintf("unexpected argument %q", pos[maxArgs]))
	}
	return pos, nil
}

func (a *app) usageError(cmd *command, msg string) error {
	fmt.Fprintf(a.stderr, "modelcachectl %s: %s\nUsage: modelcachectl %s\nRun 'modelcachectl %s -h' for help.\n", cmd.name, msg, cmd.synopsis, cmd.name)
	return errUsage
}

// outputFlag adds --output to a listing command.
func outputFlag(fs *flag.FlagSet) *string {
	return fs.String("output", "table", "`FORMAT` of the output: table or json")
}

func (a *app) checkOutput(cmd *command, output string) error {
	if output != "table" && output != "json" {
		return a.usageError(cmd, fmt.Sprintf("--output must be table or json, not %q", output))
	}
	return nil
}

func (a *app) client() *adminapi.Client {
	if a.cl == nil {
		a.cl = adminapi.NewClient(a.socket)
	}
	return a.cl
}

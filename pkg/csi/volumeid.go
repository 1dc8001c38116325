package csi

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
)

// Volume IDs issued by the controller look like
//
//	mc1-<32 hex: digest of the CreateVolume name>-<8 hex: check over the rest>
//
// The ID follows from the name alone, so a repeated CreateVolume gets the
// same ID even after the controller lost its records. The check lets the
// controller tell its own IDs from anything else without a lookup, and
// refuse a truncated or edited ID instead of misreading it. The model
// reference never appears in an ID (it may be long and says where models
// live): it travels in volume_context.
const (
	volumeIDVersion = "mc1"
	volumeIDLen     = len(volumeIDVersion) + 1 + 32 + 1 + 8
)

// errForeignVolumeID marks a volume ID this controller did not issue.
var errForeignVolumeID = errors.New("not a modelcache volume ID")

// volumeIDForName returns the volume ID for a CreateVolume name.
func volumeIDForName(name string) string {
	sum := sha256.Sum256([]byte(DriverName + "/volume/" + volumeIDVersion + "\x00" + name))
	body := volumeIDVersion + "-" + hex.EncodeToString(sum[:16])
	return body + "-" + volumeIDCheck(body)
}

func volumeIDCheck(body string) string {
	sum := sha256.Sum256([]byte(body))
	return hex.EncodeToString(sum[:4])
}

// checkVolumeID reports whether id is a well-formed ID of the current version.
func checkVolumeID(id string) error {
	if len(id) != volumeIDLen || !strings.HasPrefix(id, volumeIDVersion+"-") {
		return fmt.Errorf("%w: %q does not have the form %s-<32 hex>-<8 hex>", errForeignVolumeID, id, volumeIDVersion)
	}
	body, check := id[:volumeIDLen-9], id[volumeIDLen-8:]
	if id[volumeIDLen-9] != '-' || !isLowerHex(body[len(volumeIDVersion)+1:]) || !isLowerHex(check) {
		return fmt.Errorf("%w: %q does not have the form %s-<32 hex>-<8 hex>", errForeignVolumeID, id, volumeIDVersion)
	}
	if volumeIDCheck(body) != check {
		return fmt.Errorf("%w: %q fails its check digits (truncated or edited?)", errForeignVolumeID, id)
	}
	return nil
}

func isLowerHex(s string) bool {
	for _, c := range s {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return s != ""
}

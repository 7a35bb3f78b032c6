package main

// The caller's identities beyond a bearer token in the environment (docs/identity.md), as the Node
// plugin's src/credential/identity.cts: BROKER_AGENT_KEY (an agent key: a proof signed for this one
// request), else the OS keychain's entry for this broker (the Secret Service on the D-Bus session
// bus, as @napi-rs/keyring keeps it: service "task-broker"): an agent key, else a person's login,
// whose refresh token is traded for a fresh ID token at the issuer (kept nowhere; a rotated refresh
// token goes back to the keychain).

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/godbus/dbus/v5"
)

type callerID struct {
	source        string
	authorization func(method, target string) (string, error)
}

// callerIdentity: a token in the environment (identity()), else BROKER_AGENT_KEY, else the keychain.
func callerIdentity(broker string) (callerID, error) {
	if os.Getenv("BROKER_IDENTITY_TOKEN_FILE") == "" && strings.TrimSpace(os.Getenv("BROKER_IDENTITY_TOKEN")) == "" {
		if key := strings.TrimSpace(os.Getenv("BROKER_AGENT_KEY")); key != "" {
			return agentKeyIdentity(key, "BROKER_AGENT_KEY")
		}
		if os.Getenv("BROKER_KEYCHAIN") == "keyutils" {
			return callerID{}, fail(exitUnauthenticated, "no identity: the native plugin reads the Secret Service only, not the kernel keyring (BROKER_KEYCHAIN=keyutils): use the Node plugin, or BROKER_AGENT_KEY")
		}
		stored, err := secretServiceGet("agent-key " + broker)
		if err != nil {
			return callerID{}, fail(exitUnauthenticated, "no identity: set BROKER_IDENTITY_TOKEN_FILE (e.g. a projected ServiceAccount token) or BROKER_IDENTITY_TOKEN, or BROKER_AGENT_KEY; the OS keychain, where broker agent enroll and broker login keep theirs, cannot be used: %s", err)
		}
		if stored != "" {
			return agentKeyIdentity(stored, "keychain (agent key)")
		}
		if login, err := secretServiceGet("login " + broker); err == nil && login != "" {
			return loginIdentity(login, "login "+broker)
		}
	}
	token, source, err := identity()
	if err != nil {
		return callerID{}, err
	}
	return callerID{source: source, authorization: func(string, string) (string, error) { return "Bearer " + token, nil }}, nil
}

func agentKeyIdentity(text, source string) (callerID, error) {
	parts := strings.Split(strings.TrimSpace(text), ".")
	var seed []byte
	if len(parts) == 3 && parts[0] == "tbak1" && parts[1] != "" {
		seed, _ = base64.RawURLEncoding.DecodeString(parts[2])
	}
	if len(seed) != ed25519.SeedSize {
		return callerID{}, fail(exitUnauthenticated, "%s is not an agent key (the form is tbak1.AGENT.SEED)", source)
	}
	key := ed25519.NewKeyFromSeed(seed)
	agent := parts[1]
	b64 := base64.RawURLEncoding.EncodeToString
	return callerID{source: source, authorization: func(method, target string) (string, error) {
		iat := time.Now().Unix()
		jti := make([]byte, 16)
		_, _ = rand.Read(jti)
		claims, _ := json.Marshal(struct {
			Sub string `json:"sub"`
			Htm string `json:"htm"`
			Htu string `json:"htu"`
			Iat int64  `json:"iat"`
			Exp int64  `json:"exp"`
			Jti string `json:"jti"`
		}{agent, method, target, iat, iat + 30, b64(jti)})
		input := b64([]byte(`{"alg":"EdDSA","typ":"agent-proof+jwt"}`)) + "." + b64(claims)
		return "AgentProof " + input + "." + b64(ed25519.Sign(key, []byte(input))), nil
	}}, nil
}

func loginIdentity(text, account string) (callerID, error) {
	var stored struct {
		Issuer       string `json:"issuer"`
		ClientID     string `json:"clientId"`
		RefreshToken string `json:"refreshToken"`
	}
	if json.Unmarshal([]byte(text), &stored) != nil || stored.Issuer == "" || stored.ClientID == "" || stored.RefreshToken == "" {
		return callerID{}, fail(exitUnauthenticated, "the keychain's login is unreadable: run broker logout, then broker login")
	}
	return callerID{source: "keychain (login at " + stored.Issuer + ")", authorization: func(string, string) (string, error) {
		refreshFailed := func(why string) error {
			return fail(exitUnauthenticated, "the login at %s could not be refreshed (%s): run broker login again", stored.Issuer, why)
		}
		client := &http.Client{Timeout: 10 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
		res, err := client.Get(strings.TrimSuffix(stored.Issuer, "/") + "/.well-known/openid-configuration")
		if err != nil {
			return "", refreshFailed(err.Error())
		}
		var meta struct {
			TokenEndpoint string `json:"token_endpoint"`
		}
		err = json.NewDecoder(res.Body).Decode(&meta)
		res.Body.Close()
		if err != nil || meta.TokenEndpoint == "" {
			return "", refreshFailed("no token_endpoint")
		}
		form := url.Values{"grant_type": {"refresh_token"}, "refresh_token": {stored.RefreshToken}, "client_id": {stored.ClientID}, "scope": {"openid offline_access profile"}}
		res, err = client.PostForm(meta.TokenEndpoint, form)
		if err != nil {
			return "", refreshFailed(err.Error())
		}
		defer res.Body.Close()
		var body struct {
			IDToken      string `json:"id_token"`
			RefreshToken string `json:"refresh_token"`
			Error        string `json:"error"`
		}
		_ = json.NewDecoder(res.Body).Decode(&body)
		if res.StatusCode != http.StatusOK {
			return "", refreshFailed(fmt.Sprintf("%d %s", res.StatusCode, body.Error))
		}
		if body.IDToken == "" {
			return "", fail(exitUnauthenticated, "%s gave no ID token on refresh: run broker login again", stored.Issuer)
		}
		if _, _, err := checked(body.IDToken, "the issuer"); err != nil {
			return "", err
		}
		// An issuer that rotates refresh tokens has just used this one up: the new one goes back to the keychain.
		if body.RefreshToken != "" && body.RefreshToken != stored.RefreshToken {
			stored.RefreshToken = body.RefreshToken
			updated, _ := json.Marshal(stored)
			if err := secretServiceUpdate(account, string(updated)); err != nil {
				return "", fail(exitUnauthenticated, "the login at %s was refreshed, but the new refresh token could not be kept in the keychain (%s): run broker login again", stored.Issuer, err)
			}
		}
		return "Bearer " + body.IDToken, nil
	}}, nil
}

// secretServiceUpdate replaces the secret of the existing keychain entry ACCOUNT (its attributes, as
// @napi-rs/keyring wrote them, stay).
func secretServiceUpdate(account, value string) error {
	conn, err := dbus.ConnectSessionBus()
	if err != nil {
		return err
	}
	defer conn.Close()
	service := conn.Object("org.freedesktop.secrets", "/org/freedesktop/secrets")
	var output dbus.Variant
	var session dbus.ObjectPath
	if err := service.Call("org.freedesktop.Secret.Service.OpenSession", 0, "plain", dbus.MakeVariant("")).Store(&output, &session); err != nil {
		return err
	}
	var unlocked, locked []dbus.ObjectPath
	if err := service.Call("org.freedesktop.Secret.Service.SearchItems", 0, map[string]string{"service": "task-broker", "username": account}).Store(&unlocked, &locked); err != nil {
		return err
	}
	if len(unlocked) == 0 {
		return fmt.Errorf("no unlocked entry for %s", account)
	}
	secret := struct {
		Session     dbus.ObjectPath
		Parameters  []byte
		Value       []byte
		ContentType string
	}{session, []byte{}, []byte(value), "text/plain"}
	return conn.Object("org.freedesktop.secrets", unlocked[0]).Call("org.freedesktop.Secret.Item.SetSecret", 0, secret).Err
}

// secretServiceGet reads the keychain entry of @napi-rs/keyring (service "task-broker", username
// ACCOUNT) from the Secret Service; "" when there is none. An error when there is no Secret Service.
func secretServiceGet(account string) (string, error) {
	conn, err := dbus.ConnectSessionBus()
	if err != nil {
		return "", err
	}
	defer conn.Close()
	service := conn.Object("org.freedesktop.secrets", "/org/freedesktop/secrets")
	var output dbus.Variant
	var session dbus.ObjectPath
	if err := service.Call("org.freedesktop.Secret.Service.OpenSession", 0, "plain", dbus.MakeVariant("")).Store(&output, &session); err != nil {
		return "", err
	}
	var unlocked, locked []dbus.ObjectPath
	attributes := map[string]string{"service": "task-broker", "username": account}
	if err := service.Call("org.freedesktop.Secret.Service.SearchItems", 0, attributes).Store(&unlocked, &locked); err != nil {
		return "", err
	}
	if len(unlocked) == 0 {
		if len(locked) > 0 {
			return "", fmt.Errorf("the keychain holds an entry for %s but is locked: unlock it (the plugin never prompts)", account)
		}
		return "", nil
	}
	type secret struct {
		Session     dbus.ObjectPath
		Parameters  []byte
		Value       []byte
		ContentType string
	}
	var secrets map[dbus.ObjectPath]secret
	if err := service.Call("org.freedesktop.Secret.Service.GetSecrets", 0, unlocked[:1], session).Store(&secrets); err != nil {
		return "", err
	}
	s, ok := secrets[unlocked[0]]
	if !ok {
		return "", nil
	}
	return string(s.Value), nil
}

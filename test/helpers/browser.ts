/**
 * Debian's chromium (`apt-get install chromium`; .ci/run installs it), driven by playwright-core
 * through `executablePath`: no browser download. Headless, no sandbox (tests run as root), nothing
 * that phones home (background networking, component updates, sync). Each launch has a fresh profile
 * in a temporary directory that playwright makes and removes at close (it refuses --user-data-dir
 * with launch(); each test user gets a context of its own, with its own cookies).
 */
import { existsSync } from 'node:fs';
import { chromium, type Browser, type BrowserContext } from 'playwright-core';

export const CHROMIUM = process.env['CHROMIUM_PATH'] ?? '/usr/bin/chromium';

export function browserAvailable(): boolean {
  return existsSync(CHROMIUM);
}

export interface TestBrowser {
  /** A context of its own (cookies, storage) in the one browser. */
  newContext(options?: Parameters<Browser['newContext']>[0]): Promise<BrowserContext>;
  close(): Promise<void>;
}

export async function launchBrowser(): Promise<TestBrowser> {
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--disable-dev-shm-usage',
    ],
  });
  return {
    newContext: (options) => browser.newContext(options),
    close: async () => {
      await browser.close().catch(() => undefined);
    },
  };
}

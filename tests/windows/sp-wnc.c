/* sp-wnc HOST PORT [-k]: a minimal Windows TCP client for the Windows tests (tests/tests/windows.rs),
 * so that the process connecting to the agent is a Windows process with a Windows owner, as on a
 * real desktop. It copies stdin to the connection and the connection to stdout until the far end
 * closes. It half-closes its side once stdin is done *and* the answer has begun (or 5 s have
 * passed): a FIN that follows the request at once can cost the answer (see docs/install.md,
 * "What running under Wine found"). With -k it never half-closes (for HTTP servers
 * that end a response when the client's side ends, and close by themselves after
 * `Connection: close`). Exit code 0 when the far end closed cleanly, 2
 * when the connection could not be made, 3 when it was reset. */
#include <winsock2.h>
#include <ws2tcpip.h>
#include <windows.h>
#include <stdio.h>

static SOCKET s;
static HANDLE answered;
static int keep_open;

static DWORD WINAPI upload(LPVOID arg)
{
    HANDLE in = GetStdHandle(STD_INPUT_HANDLE);
    static char buf[65536];
    DWORD n;
    (void)arg;
    while (ReadFile(in, buf, sizeof buf, &n, NULL) && n > 0) {
        DWORD off = 0;
        while (off < n) {
            int w = send(s, buf + off, (int)(n - off), 0);
            if (w <= 0)
                return 1;
            off += (DWORD)w;
        }
    }
    if (keep_open)
        return 0;
    WaitForSingleObject(answered, 5000);
    shutdown(s, SD_SEND);
    return 0;
}

int main(int argc, char **argv)
{
    WSADATA wsa;
    struct addrinfo hints, *ai;
    static char buf[65536];
    HANDLE out = GetStdHandle(STD_OUTPUT_HANDLE);
    int n;
    if (argc == 4 && strcmp(argv[3], "-k") == 0)
        keep_open = 1;
    else if (argc != 3) {
        fprintf(stderr, "usage: sp-wnc HOST PORT [-k]\n");
        return 64;
    }
    if (WSAStartup(MAKEWORD(2, 2), &wsa) != 0)
        return 2;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(argv[1], argv[2], &hints, &ai) != 0) {
        fprintf(stderr, "sp-wnc: cannot resolve %s\n", argv[1]);
        return 2;
    }
    s = socket(ai->ai_family, SOCK_STREAM, IPPROTO_TCP);
    if (s == INVALID_SOCKET || connect(s, ai->ai_addr, (int)ai->ai_addrlen) != 0) {
        fprintf(stderr, "sp-wnc: cannot connect to %s:%s (error %d)\n", argv[1], argv[2],
                WSAGetLastError());
        return 2;
    }
    answered = CreateEventA(NULL, TRUE, FALSE, NULL);
    CreateThread(NULL, 0, upload, NULL, 0, NULL);
    while ((n = recv(s, buf, sizeof buf, 0)) > 0) {
        SetEvent(answered);
        DWORD off = 0, w;
        while (off < (DWORD)n) {
            if (!WriteFile(out, buf + off, (DWORD)n - off, &w, NULL))
                return 4;
            off += w;
        }
    }
    if (n < 0) {
        fprintf(stderr, "sp-wnc: connection reset (error %d)\n", WSAGetLastError());
        return 3;
    }
    return 0;
}
